package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/zgolden/zgolden/driver"
)

// TestBootOrder reads the unit that `make install` installs (packaging/install.sh, staged with
// DESTDIR) next to the docker.service of the host's docker.io package, then breaks and mends the
// ordering with drop-ins, as an administrator would.
func TestBootOrder(t *testing.T) {
	const dockerUnits = "/lib/systemd/system"
	if _, err := os.Stat(filepath.Join(dockerUnits, "docker.service")); err != nil {
		t.Skip("skipped: no docker.service here (apt-get install docker.io)")
	}
	stage := t.TempDir()
	bin, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("bash", "../packaging/install.sh", "install")
	cmd.Env = append(os.Environ(), "DESTDIR="+stage, "BIN="+bin)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("packaging/install.sh install: %v\n%s", err, out)
	}
	etc := filepath.Join(stage, "etc/systemd/system")
	dirs := []string{etc, dockerUnits}
	dropin := func(unit, name, content string) {
		t.Helper()
		dir := filepath.Join(etc, unit+".d")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	expect := func(what, backend string, level driver.Level, says string) {
		t.Helper()
		f := checkBootOrder(dirs, "zgolden.service", backend)
		if f.Level != level || !strings.Contains(f.Detail, says) {
			t.Errorf("%s: finding %+v; want level %s saying %q", what, f, level, says)
		}
		if level != driver.LevelOK && f.Action == "" {
			t.Errorf("%s: finding %+v says nothing to do", what, f)
		}
	}
	expect("the installed unit, ZFS", "zfs", driver.LevelOK, "before docker.service and after the ZFS pool import")
	expect("the installed unit, reflink", "reflink", driver.LevelOK, "starts before docker.service")

	dropin("zgolden.service", "10-after.conf", "[Unit]\nAfter=\nAfter=local-fs.target\n")
	expect("After= reset", "zfs", driver.LevelWarn, "not after the ZFS pool import")
	expect("After= reset, reflink", "reflink", driver.LevelOK, "starts before docker.service")

	dropin("zgolden.service", "20-before.conf", "# an override that drops the ordering\n[Unit]\nBefore=\n")
	expect("Before= reset", "reflink", driver.LevelProblem, "not ordered before docker.service")

	// The same order said from docker's side is as good.
	dropin("docker.service", "zgolden.conf", "[Unit]\nAfter=zgolden.service\n")
	expect("docker.service After=zgolden.service", "reflink", driver.LevelOK, "starts before docker.service")

	if f := checkBootOrder(dirs, "missing.service", "zfs"); f.Level != driver.LevelWarn {
		t.Errorf("a unit without a file: %+v; want a warning", f)
	}
}

func TestUnitOf(t *testing.T) {
	dir := t.TempDir()
	for content, want := range map[string]string{
		"0::/system.slice/zgolden.service\n":                                             "zgolden.service",
		"1:name=systemd:/system.slice/zgolden.service\n0::/\n":                           "zgolden.service",
		"4:memory:/docker/abc\n0::/user.slice/user-0.slice/session-1.scope\n":            "",
		"9:name=systemd:/\n4:memory:/process_api/9eed15e6928ddb0c21232fabf7ebec65\n0::/": "",
	} {
		p := filepath.Join(dir, "cgroup")
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		if got := unitOf(p); got != want {
			t.Errorf("unitOf(%q) = %q, want %q", content, got, want)
		}
	}
}
