package main

import (
	"bufio"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"github.com/zgolden/zgolden/driver"
)

// unitDirs are where systemd looks for units, most important first (systemd.unit(5)). A unit
// file is taken from the first directory that has it; drop-ins (UNIT.d/*.conf) from all of them,
// applied in file-name order, the first directory winning a name.
var unitDirs = []string{"/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system"}

// poolUnits are the units after which a ZFS pool is imported (zfsutils-linux ships them).
var poolUnits = []string{"zfs-import.target", "zfs-import-cache.service", "zfs-import-scan.service", "zfs.target", "zfs-volumes.target"}

// bootOrderFinding checks, for `zgolden doctor`, that on a systemd host the unit zgolden runs as
// starts before docker.service, and after the pool is imported on ZFS. dockerd restarts the
// containers that use zgolden volumes at boot and waits only about 30 s for a legacy plugin's
// socket, so a zgolden that starts after it leaves those containers dead until someone starts
// them (docs/design-facts.md, "Boot order"). The unit files are read the way systemd merges them
// for ordering, since a doctor that asked systemctl would need the manager it checks.
func bootOrderFinding(backend string) driver.Finding {
	f := driver.Finding{Check: "boot order"}
	if _, err := os.Stat("/run/systemd/system"); err != nil {
		f.Level, f.Detail = driver.LevelOK, "not a systemd host: nothing orders zgolden against dockerd here"
		return f
	}
	unit := unitOf("/proc/self/cgroup")
	if unit == "" {
		f.Level, f.Detail = driver.LevelOK, "zgolden does not run as a systemd service (the managed plugin, or started by hand): no unit to order"
		return f
	}
	return checkBootOrder(unitDirs, unit, backend)
}

// unitOf returns the .service unit whose cgroup the process is in, from a /proc/PID/cgroup file:
// the unified hierarchy's line (0::PATH), else systemd's own (N:name=systemd:PATH).
func unitOf(cgroupFile string) string {
	data, err := os.ReadFile(cgroupFile)
	if err != nil {
		return ""
	}
	var unified, named string
	for _, l := range strings.Split(string(data), "\n") {
		parts := strings.SplitN(l, ":", 3)
		if len(parts) != 3 {
			continue
		}
		switch {
		case parts[0] == "0" && parts[1] == "":
			unified = parts[2]
		case parts[1] == "name=systemd":
			named = parts[2]
		}
	}
	for _, p := range []string{unified, named} {
		if b := path.Base(p); strings.HasSuffix(b, ".service") {
			return b
		}
	}
	return ""
}

// checkBootOrder is bootOrderFinding for unit, with the unit files read from dirs.
func checkBootOrder(dirs []string, unit, backend string) driver.Finding {
	f := driver.Finding{Check: "boot order"}
	self, err := unitOrdering(dirs, unit)
	if err != nil {
		f.Level, f.Detail = driver.LevelWarn, fmt.Sprintf("cannot read unit %s: %v", unit, err)
		f.Action = "check the unit's files under /etc/systemd/system and /lib/systemd/system"
		return f
	}
	docker, err := unitOrdering(dirs, "docker.service")
	if err != nil {
		f.Level, f.Detail = driver.LevelWarn, fmt.Sprintf("zgolden runs as %s, but docker.service cannot be read: %v", unit, err)
		return f
	}
	if !slices.Contains(self.before, "docker.service") && !slices.Contains(docker.after, unit) {
		f.Level = driver.LevelProblem
		f.Detail = fmt.Sprintf("zgolden runs as %s, which is not ordered before docker.service: at boot dockerd may look for zgolden's socket before it answers, and the containers that use zgolden volumes then stay stopped", unit)
		f.Action = fmt.Sprintf("add Before=docker.service to the [Unit] section of %s (the unit `make install` writes has it), then systemctl daemon-reload", unit)
		return f
	}
	if backend == "zfs" && !slices.ContainsFunc(poolUnits, func(u string) bool { return slices.Contains(self.after, u) }) {
		f.Level = driver.LevelWarn
		f.Detail = fmt.Sprintf("%s starts before docker.service, but not after the ZFS pool import (%s): only --wait-pool then keeps it from starting without its parent dataset", unit, strings.Join(poolUnits[:2], ", "))
		f.Action = fmt.Sprintf("add Wants=zfs-import.target and After=zfs-import.target zfs.target zfs-volumes.target to %s", unit)
		return f
	}
	f.Level, f.Detail = driver.LevelOK, fmt.Sprintf("%s starts before docker.service%s", unit, map[bool]string{true: " and after the ZFS pool import", false: ""}[backend == "zfs"])
	return f
}

// ordering is a unit's Before= and After= lists.
type ordering struct{ before, after []string }

// unitOrdering reads unit's Before= and After= from its file and drop-ins in dirs. An empty
// assignment resets a list, as in systemd.
func unitOrdering(dirs []string, unit string) (ordering, error) {
	var files []string
	for _, d := range dirs {
		if p := filepath.Join(d, unit); fileExists(p) {
			files = append(files, p)
			break
		}
	}
	if len(files) == 0 {
		return ordering{}, fmt.Errorf("no unit file %s in %s", unit, strings.Join(dirs, ", "))
	}
	dropins := map[string]string{} // file name -> path; the first directory wins a name
	for _, d := range dirs {
		matches, _ := filepath.Glob(filepath.Join(d, unit+".d", "*.conf"))
		for _, m := range matches {
			if _, ok := dropins[filepath.Base(m)]; !ok {
				dropins[filepath.Base(m)] = m
			}
		}
	}
	names := make([]string, 0, len(dropins))
	for n := range dropins {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		files = append(files, dropins[n])
	}
	var o ordering
	for _, p := range files {
		if err := o.read(p); err != nil {
			return o, err
		}
	}
	return o, nil
}

func (o *ordering) read(file string) error {
	fh, err := os.Open(file)
	if err != nil {
		return err
	}
	defer fh.Close()
	section := ""
	sc := bufio.NewScanner(fh)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || line[0] == '#' || line[0] == ';':
			continue
		case line[0] == '[':
			section = line
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok || section != "[Unit]" {
			continue
		}
		var list *[]string
		switch strings.TrimSpace(k) {
		case "Before":
			list = &o.before
		case "After":
			list = &o.after
		default:
			continue
		}
		if v = strings.TrimSpace(v); v == "" {
			*list = nil
			continue
		}
		*list = append(*list, strings.Fields(v)...)
	}
	return sc.Err()
}

func fileExists(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && !fi.IsDir()
}
