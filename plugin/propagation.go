package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/moby/sys/mountinfo"

	"github.com/zgolden/zgolden/driver"
)

// propagationFinding checks, for `zgolden doctor`, that the volumes zgolden mounts under its
// mount root reach dockerd. They do when zgolden mounts in dockerd's own mount namespace, or when
// the mount root sits on a shared mount, which carries mounts across namespaces: the managed
// plugin's propagated mount is one (Docker makes it rshared). A daemon
// started in a mount namespace of its own (systemd's PrivateMounts, MountFlags=private,
// `unshare -m`) on a private mount makes volumes that Docker's containers see as empty
// directories, with no error anywhere.
func propagationFinding(mountRoot string) driver.Finding {
	f := driver.Finding{Check: "mount propagation"}
	m, err := mountOf(mountRoot)
	if err != nil {
		f.Level, f.Detail = driver.LevelWarn, fmt.Sprintf("cannot read the mount table for %s: %v", mountRoot, err)
		return f
	}
	if shared := sharedTag(m.Optional); shared != "" {
		f.Level, f.Detail = driver.LevelOK, fmt.Sprintf("mount root %s is on %s, a shared mount (%s): volume mounts reach dockerd", mountRoot, m.Mountpoint, shared)
		return f
	}
	self, err := os.Readlink("/proc/self/ns/mnt")
	docker, pid := dockerdNamespace()
	switch {
	case err != nil:
		f.Level, f.Detail = driver.LevelWarn, fmt.Sprintf("cannot read zgolden's own mount namespace (%v), and mount root %s is on %s, which is not a shared mount", err, mountRoot, m.Mountpoint)
		f.Action = "check that zgolden runs in the host's mount namespace, or make the mount root shared: mount --make-rshared " + m.Mountpoint
	case docker == "":
		// No dockerd to compare with (none running, or out of sight in a container of its own).
		f.Level, f.Detail = driver.LevelWarn, fmt.Sprintf("no dockerd in sight to compare mount namespaces with, and mount root %s is on %s, which is not a shared mount", mountRoot, m.Mountpoint)
		f.Action = "if Docker runs on this host, check that zgolden runs in its mount namespace, or make the mount root shared: mount --make-rshared " + m.Mountpoint
	case docker == self:
		f.Level, f.Detail = driver.LevelOK, fmt.Sprintf("zgolden mounts in dockerd's mount namespace (%s, dockerd pid %d), where its volumes are seen; mount root %s is on %s (not shared)", self, pid, mountRoot, m.Mountpoint)
	default:
		f.Level = driver.LevelProblem
		f.Detail = fmt.Sprintf("zgolden runs in a mount namespace (%s) other than dockerd's (%s, pid %d) and its mount root %s is on %s, which is not a shared mount: the volumes it mounts never reach dockerd, and containers see empty directories", self, docker, pid, mountRoot, m.Mountpoint)
		f.Action = "run zgolden in the host's mount namespace (no PrivateMounts=, MountFlags= or unshare in its unit), or make the mount root shared: mount --make-rshared " + m.Mountpoint
	}
	return f
}

// dockerdNamespace returns the mount namespace of the running dockerd and its pid, or "": from
// its pid file, else from a scan of /proc for a process named dockerd.
func dockerdNamespace() (string, int) {
	var pids []int
	if data, err := os.ReadFile("/var/run/docker.pid"); err == nil {
		if pid, err := strconv.Atoi(strings.TrimSpace(string(data))); err == nil {
			pids = append(pids, pid)
		}
	}
	if entries, err := os.ReadDir("/proc"); err == nil {
		for _, e := range entries {
			if pid, err := strconv.Atoi(e.Name()); err == nil {
				if comm, err := os.ReadFile(filepath.Join("/proc", e.Name(), "comm")); err == nil && strings.TrimSpace(string(comm)) == "dockerd" {
					pids = append(pids, pid)
				}
			}
		}
	}
	for _, pid := range pids {
		if ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", pid)); err == nil {
			return ns, pid
		}
	}
	return "", 0
}

// mountOf returns the mount that holds path: the entry with the longest mount point above it.
func mountOf(path string) (*mountinfo.Info, error) {
	path = filepath.Clean(path)
	if p, err := filepath.EvalSymlinks(path); err == nil {
		path = p
	}
	mounts, err := mountinfo.GetMounts(func(i *mountinfo.Info) (skip, stop bool) {
		return !(i.Mountpoint == "/" || path == i.Mountpoint || strings.HasPrefix(path, i.Mountpoint+"/")), false
	})
	if err != nil {
		return nil, err
	}
	var best *mountinfo.Info
	for _, m := range mounts {
		// The last of equal mount points is the one on top.
		if best == nil || len(m.Mountpoint) >= len(best.Mountpoint) {
			best = m
		}
	}
	if best == nil {
		return nil, fmt.Errorf("no mount holds %s", path)
	}
	return best, nil
}

// sharedTag returns the "shared:N" of a mount's optional fields, or "".
func sharedTag(optional string) string {
	for _, f := range strings.Fields(optional) {
		if strings.HasPrefix(f, "shared:") {
			return f
		}
	}
	return ""
}
