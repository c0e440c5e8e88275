package plugin

import (
	"context"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/zgolden/zgolden/tests/harness"
)

// TestHostDaemonInstall is make install and make uninstall, staged with DESTDIR (this machine has
// no systemd to enable units with): the files and their modes, the unit passing systemd-analyze
// verify, an existing /etc/default/zgolden kept, the unit's readiness check waiting for zgolden
// to answer, and uninstall removing only what install put there.
func TestHostDaemonInstall(t *testing.T) {
	harness.RequireRoot(t) // not for the staging, but make install builds bin/zgolden: an integration test
	harness.RequireTools(t, "make")
	if _, err := exec.LookPath("go"); err != nil {
		if _, err := os.Stat("/usr/local/go/bin/go"); err != nil { // where the Makefile also looks
			t.Skip("make install builds bin/zgolden, and this machine has no Go (the ZFS guests have make but no Go); the host runs this test")
		}
	}
	dest := t.TempDir()
	makeCmd := func(target string) string {
		t.Helper()
		return harness.Run(t, "make", "-C", repo(t), "--no-print-directory", target, "DESTDIR="+dest)
	}
	makeCmd("install")
	bin := filepath.Join(dest, "usr/local/bin/zgolden")
	unit := filepath.Join(dest, "etc/systemd/system/zgolden.service")
	defaults := filepath.Join(dest, "etc/default/zgolden")
	for path, mode := range map[string]os.FileMode{bin: 0o755, unit: 0o644, defaults: 0o644} {
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatalf("make install did not install %s: %v", path, err)
		}
		if fi.Mode().Perm() != mode {
			t.Errorf("%s has mode %v, want %v", path, fi.Mode().Perm(), mode)
		}
	}
	if out := harness.Run(t, bin, "version"); !strings.HasPrefix(out, "zgolden ") {
		t.Errorf("installed binary: %q", out)
	}
	unitText := readFile(unit)
	for _, want := range []string{"ExecStart=/usr/local/bin/zgolden serve", "Before=docker.service",
		"After=zfs-import.target", "Wants=zfs-import.target", "EnvironmentFile=-/etc/default/zgolden", "ZGOLDEN_WAIT_POOL="} {
		if !strings.Contains(unitText, want) {
			t.Errorf("the unit lacks %q", want)
		}
	}

	// systemd-analyze verify checks that the binaries exist, so verify a copy naming the staged one.
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Log("systemd-analyze is not installed: the unit's syntax is not verified")
	} else {
		vdir := t.TempDir()
		staged := strings.ReplaceAll(unitText, "/usr/local/bin/zgolden", bin)
		if err := os.WriteFile(filepath.Join(vdir, "zgolden.service"), []byte(staged), 0o644); err != nil {
			t.Fatal(err)
		}
		// verify exits 0 on unknown keys too, so any output is a finding.
		if out, err := harness.Output("systemd-analyze", "verify", filepath.Join(vdir, "zgolden.service")); err != nil || strings.TrimSpace(out) != "" {
			t.Errorf("systemd-analyze verify zgolden.service: %v\n%s", err, out)
		}
	}

	checkReadiness(t, unitText, bin)

	// A second install keeps settings the admin changed.
	if err := os.WriteFile(defaults, []byte(readFile(defaults)+"ZGOLDEN_BACKEND=zfs\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if out := makeCmd("install"); !strings.Contains(out, "kept the existing") {
		t.Errorf("make install over an existing /etc/default/zgolden did not say it kept it:\n%s", out)
	}
	if !strings.Contains(readFile(defaults), "ZGOLDEN_BACKEND=zfs") {
		t.Fatal("make install overwrote the changed /etc/default/zgolden")
	}

	makeCmd("uninstall")
	for _, gone := range []string{bin, unit} {
		if _, err := os.Stat(gone); err == nil {
			t.Errorf("make uninstall left %s", gone)
		}
	}
	if !strings.Contains(readFile(defaults), "ZGOLDEN_BACKEND=zfs") {
		t.Error("make uninstall removed a changed /etc/default/zgolden")
	}
	// An unchanged example is removed with the rest.
	os.Remove(defaults)
	makeCmd("install")
	makeCmd("uninstall")
	if _, err := os.Stat(defaults); err == nil {
		t.Error("make uninstall left the unchanged example /etc/default/zgolden")
	}
}

// checkReadiness runs the unit's ExecStartPost as systemd would (after unescaping $$) and
// checks that it keeps waiting while nothing answers on the admin socket, and returns once a
// server answers there; the socket's place comes from ZGOLDEN_STATE_DIR, as /etc/default/zgolden
// may set it.
func checkReadiness(t *testing.T, unitText, bin string) {
	t.Helper()
	var script string
	for _, l := range strings.Split(unitText, "\n") {
		if v, ok := strings.CutPrefix(l, "ExecStartPost=/bin/sh -c '"); ok {
			script = strings.TrimSuffix(v, "'")
		}
	}
	if script == "" {
		t.Fatal("the unit has no ExecStartPost=/bin/sh -c '...' readiness check")
	}
	script = strings.ReplaceAll(strings.ReplaceAll(script, "$$", "$"), "/usr/local/bin/zgolden", bin)
	state := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "/bin/sh", "-c", script)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "ZGOLDEN_STATE_DIR=" + state}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		t.Fatalf("the readiness check returned (%v) while nothing answered on %s/admin.sock", err, state)
	case <-time.After(2 * time.Second):
	}
	// A stand-in for zgolden serve's admin API: enough for `zgolden status`.
	l, err := net.Listen("unix", filepath.Join(state, "admin.sock"))
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"backend":"reflink","volumes":0}`))
	}), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(l) }()
	defer srv.Close()
	if err := <-done; err != nil {
		t.Fatalf("the readiness check failed once zgolden answered: %v", err)
	}
}
