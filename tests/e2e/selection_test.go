package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/zgolden/zgolden/tests/harness"
)

// TestBackendSelection: --backend zfs without ZFS fails fast with one clear error, and auto
// falls back to the reflink store, saying which backend it chose and why.
func TestBackendSelection(t *testing.T) {
	harness.RequireRoot(t)
	bin := harness.Binary(t)
	if _, err := os.Stat("/dev/zfs"); err == nil {
		t.Skip("this machine has ZFS; the fallback is tested on hosts without it")
	}
	dir := t.TempDir()
	common := []string{"serve", "--socket", filepath.Join(dir, "p.sock"), "--state-dir", filepath.Join(dir, "state"),
		"--mount-root", filepath.Join(dir, "mnt"), "--root", filepath.Join(dir, "root"), "--store-size", "1G"}

	out, err := harness.Output(bin, append(common, "--backend", "zfs", "--parent", "tank/zgolden")...)
	if err == nil || !strings.Contains(out, "--backend zfs") || !strings.Contains(out, "zfs") {
		t.Fatalf("--backend zfs without ZFS: err=%v, output:\n%s\nwant a failure naming what is missing", err, out)
	}
	if lines := strings.Count(strings.TrimSpace(out), "\n") + 1; lines > 3 {
		t.Errorf("the failure should be one clear error, got %d lines:\n%s", lines, out)
	}

	cmd := exec.Command(bin, append(common, "--backend", "auto", "--parent", "tank/zgolden")...)
	var logs lockedWriter
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		_, _ = harness.Output("umount", filepath.Join(dir, "root", "store"))
	}()
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(logs.String(), "zgolden serving") {
		if time.Now().After(deadline) {
			t.Fatalf("auto did not start serving:\n%s", logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	got := logs.String()
	if !strings.Contains(got, "falling back to the reflink store") || !strings.Contains(got, "backend chosen: reflink") {
		t.Fatalf("auto without ZFS should log the fallback and its reason:\n%s", got)
	}
	for _, sock := range []string{filepath.Join(dir, "p.sock"), filepath.Join(dir, "state", "admin.sock")} {
		fi, err := os.Stat(sock)
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v, %v; want 0600 (root only)", sock, fi.Mode().Perm(), err)
		}
	}
}

type lockedWriter struct {
	mu  sync.Mutex
	buf strings.Builder
}

func (w *lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.Write(p)
}

func (w *lockedWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}
