package hostile

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/moby/sys/mountinfo"

	"github.com/zgolden/zgolden/tests/harness"
)

// TestBusyVolume holds a file open in a volume (as a shell or a backup job on the host would)
// while its container stops and while it is removed: each failure is reported clearly, nothing
// is unmounted lazily (the mount stays in the mount table and the open file keeps working), a
// plugin restart in that state still starts, and once the file is closed the volume is removed
// and leaves nothing.
func TestBusyVolume(t *testing.T) {
	e := startEnv(t, envOpts{docker: true})
	before := e.inventory(t)
	v, c := e.name("busy"), e.name("user")
	t.Cleanup(func() {
		if slices.Contains(strings.Fields(harness.DockerCmd(t, "volume", "ls", "-q", "--filter", "driver="+e.p.Name)), v) {
			_, _ = harness.Output("docker", "volume", "rm", "-f", v)
		}
	})
	t.Cleanup(func() { _, _ = harness.Output("docker", "rm", "-f", c) })
	harness.DockerCmd(t, "volume", "create", "--driver", e.p.Name, v)
	harness.DockerCmd(t, "run", "-d", "--network", "none", "--name", c, "-v", v+":/data", harness.BusyboxImage(), "sleep", "600")

	mp := filepath.Join(e.p.MountRoot, v)
	f, err := os.Create(filepath.Join(mp, "held"))
	if err != nil {
		t.Fatalf("open a file in the mounted volume: %v", err)
	}
	defer f.Close()
	stillMounted := func(when string) {
		t.Helper()
		if ok, err := mountinfo.Mounted(mp); err != nil || !ok {
			t.Fatalf("%s: %s is no longer in the mount table (a lazy unmount?): %v", when, mp, err)
		}
		if _, err := f.WriteString(when + "\n"); err != nil {
			t.Fatalf("%s: the open file stopped working: %v", when, err)
		}
	}
	mounts := func() float64 {
		var g struct {
			Volume struct{ Status map[string]any }
		}
		if err := e.call("Get", map[string]string{"Name": v}, &g); err != nil {
			t.Fatalf("Get %s: %v", v, err)
		}
		n, _ := g.Volume.Status["mounts"].(float64)
		return n
	}

	// The container goes while the file is open: Docker sends Unmount, which cannot unmount.
	// Docker removes the container anyway and never asks again, so the plugin must not keep
	// counting it.
	harness.DockerCmd(t, "rm", "-f", c)
	stillMounted("after the container was removed")
	if n := mounts(); n != 0 {
		t.Errorf("after its only container was removed, %s is still held by %v mount(s)", v, n)
	}
	if !strings.Contains(e.p.Logs(), "busy") {
		t.Errorf("the failed unmount left no trace in the plugin's log")
	}

	// Remove while the file is open: a clear error, the volume intact.
	tried.Add(1)
	out, err := harness.Output("docker", "volume", "rm", v)
	if err == nil {
		t.Fatalf("docker volume rm of a volume with an open file succeeded: %s", out)
	}
	if !strings.Contains(out, "busy") || !strings.Contains(out, "fuser") {
		t.Errorf("docker volume rm of a busy volume: %q does not say it is busy and how to find the holder", strings.TrimSpace(out))
	}
	t.Logf("the error a user sees: %s", strings.TrimSpace(out))
	stillMounted("after the refused remove")
	if !slices.Contains(e.list(t), v) {
		t.Errorf("a refused remove dropped %s from the plugin's list", v)
	}

	// A plugin restart (kill -9) while the volume is busy and nobody holds it: the plugin
	// starts (Start fails the test otherwise) and leaves the mount alone.
	e.p.Stop(syscall.SIGKILL)
	e.p.Start()
	stillMounted("after a restart")
	if n := mounts(); n != 0 {
		t.Errorf("after a restart, %s is held by %v mount(s)", v, n)
	}

	// Released: the remove works and leaves nothing.
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if out, err := harness.Output("docker", "volume", "rm", v); err != nil {
		t.Fatalf("docker volume rm after the file was closed: %v\n%s", err, out)
	}
	if ok, _ := mountinfo.Mounted(mp); ok {
		t.Errorf("%s is still mounted after its volume was removed", mp)
	}
	if got := e.inventory(t); !slices.Equal(got, before) {
		t.Errorf("the removed busy volume left %s", diff(before, got))
	}
	e.stillServing(t, "a busy volume")
}
