package reflinkstore_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/reflinkstore"
	"github.com/zgolden/zgolden/tests/harness"
	"github.com/zgolden/zgolden/xfsutil"
)

// requireHost skips, saying why, unless the test can use real loop devices and XFS: these are
// integration tests and must never pass without having run.
func requireHost(t *testing.T) {
	t.Helper()
	harness.RequireRoot(t)
	harness.RequireTools(t, "mkfs.xfs", "xfs_growfs", "xfs_freeze", "losetup", "mount", "umount", "cp")
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		t.Skip("skipped: /dev/loop-control is missing: this host (or container) has no loop devices")
	}
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// newBase returns a fresh directory for one test on the host's disk (ext4 here), and registers a
// cleanup that unmounts and detaches whatever the test left under it, before t.TempDir removes it
// (never delete through a mount).
func newBase(t *testing.T) string {
	t.Helper()
	requireHost(t)
	base := t.TempDir()
	t.Cleanup(func() { forceClean(t, base) })
	return base
}

// forceClean unmounts every mount under base and detaches every loop device backed by a file
// under base. Mounts depend on each other across the tree (a volume's loop device holds the store
// file's filesystem busy), so it makes several passes.
func forceClean(t *testing.T, base string) {
	ctx := context.Background()
	for pass := 0; pass < 4; pass++ {
		mounts, _ := xfsutil.MountsUnder(base)
		if len(mounts) == 0 {
			break
		}
		sort.Slice(mounts, func(i, j int) bool { return len(mounts[i].Mountpoint) > len(mounts[j].Mountpoint) })
		for _, m := range mounts {
			if err := xfsutil.Unmount(ctx, m.Mountpoint); err == nil {
				t.Logf("cleanup: unmounted %s", m.Mountpoint)
			}
		}
	}
	for _, l := range loopsUnder(base) {
		if ok, err := xfsutil.DetachLoop(l.Device, l.BackingFile); err != nil {
			t.Errorf("cleanup: detach %s (%s): %v", l.Device, l.BackingFile, err)
		} else if ok {
			t.Logf("cleanup: detached %s (%s)", l.Device, l.BackingFile)
		}
	}
	if left := leaks(base); len(left) > 0 {
		t.Errorf("cleanup could not release: %v", left)
	}
}

func loopsUnder(dir string) []xfsutil.Loop {
	loops, _ := xfsutil.Loops()
	var out []xfsutil.Loop
	for _, l := range loops {
		if strings.HasPrefix(l.BackingFile, dir+"/") {
			out = append(out, l)
		}
	}
	return out
}

// leaks lists the mounts under dir and the loop devices backed by files under it.
func leaks(dir string) []string {
	var out []string
	mounts, _ := xfsutil.MountsUnder(dir)
	for _, m := range mounts {
		out = append(out, "mount "+m.Mountpoint+" ("+m.Source+")")
	}
	for _, l := range loopsUnder(dir) {
		out = append(out, "loop "+l.Device+" ("+l.BackingFile+")")
	}
	return out
}

// assertNoLeaks fails the test if anything is still mounted or attached under dir.
func assertNoLeaks(t *testing.T, dir string) {
	t.Helper()
	if left := leaks(dir); len(left) > 0 {
		t.Fatalf("leaked after the test: %v", left)
	}
}

// assertNoImageLoops fails the test if a loop device is attached to any image in the store but
// a volume's that is mounted only at its kept mount (kept.go: from the volume's first Mount to its
// Remove). The store file's own loop device, outside ROOT/store, is expected while the store is
// open.
func assertNoImageLoops(t *testing.T, e *env) {
	t.Helper()
	var left []xfsutil.Loop
	for _, l := range loopsUnder(filepath.Join(e.root, "store")) {
		mps, _ := xfsutil.LoopMountpoints(l.Device)
		kept := len(mps) == 1 && strings.HasPrefix(filepath.Base(mps[0]), "kept-") && filepath.Dir(mps[0]) == e.workDir()
		if !kept || l.Deleted || filepath.Dir(l.BackingFile) != filepath.Join(e.root, "store", "volumes") {
			left = append(left, l)
		}
	}
	if len(left) > 0 {
		t.Fatalf("loop devices still attached to images: %+v", left)
	}
}

// workDir is the store's work directory, where kept mounts live.
func (e *env) workDir() string {
	if e.cfg.WorkDir != "" {
		return e.cfg.WorkDir
	}
	return filepath.Join(e.root, "work")
}

// keptMounts lists the kept mounts in the store's work directory (kept.go).
func keptMounts(t *testing.T, e *env) []string {
	t.Helper()
	mounts, err := xfsutil.MountsUnder(e.workDir())
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, m := range mounts {
		if strings.HasPrefix(filepath.Base(m.Mountpoint), "kept-") {
			out = append(out, m.Mountpoint)
		}
	}
	return out
}

// nativeFS makes a loop-backed filesystem in base and returns its mountpoint, to run the store on a
// root that can reflink. kind is "xfs" (reflink=1), "xfs-noreflink" or "btrfs".
func nativeFS(t *testing.T, base, kind string) string {
	t.Helper()
	img := filepath.Join(base, kind+".img")
	mp := filepath.Join(base, kind)
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(4 << 30); err != nil {
		t.Fatal(err)
	}
	f.Close()
	var mkfs []string
	fstype := "xfs"
	switch kind {
	case "xfs":
		mkfs = []string{"mkfs.xfs", "-q", "-f", "-m", "reflink=1", img}
	case "xfs-noreflink":
		mkfs = []string{"mkfs.xfs", "-q", "-f", "-m", "reflink=0", img}
	case "btrfs":
		if _, err := exec.LookPath("mkfs.btrfs"); err != nil {
			t.Skip("skipped: mkfs.btrfs is not installed (apt-get install btrfs-progs)")
		}
		mkfs, fstype = []string{"mkfs.btrfs", "-q", "-f", img}, "btrfs"
	default:
		t.Fatalf("unknown filesystem kind %q", kind)
	}
	if out, err := exec.Command(mkfs[0], mkfs[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%v: %v\n%s", mkfs, err, out)
	}
	if err := os.MkdirAll(mp, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", fstype, "-o", "loop", img, mp).CombinedOutput(); err != nil {
		t.Fatalf("mount %s: %v\n%s", img, err, out)
	}
	return mp
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func testLog(t *testing.T) *logrus.Entry {
	l := logrus.New()
	l.SetOutput(testWriter{t})
	l.SetLevel(logrus.WarnLevel)
	if testing.Verbose() {
		l.SetLevel(logrus.InfoLevel)
	}
	return logrus.NewEntry(l)
}

// env is one test's store and driver: root holds the store; mounts and state are beside it.
type env struct {
	base, root, mnt, state string
	cfg                    reflinkstore.Config
	store                  *reflinkstore.Store
	d                      *driver.Driver
	stale                  []*reflinkstore.Store // replaced by open without closing, as by kill -9
}

// newEnv opens a store at root (with sizes small enough for tests) and a driver on it.
func newEnv(t *testing.T, base, root string, mut func(*reflinkstore.Config)) *env {
	t.Helper()
	e := &env{base: base, root: root, mnt: filepath.Join(base, "mnt"), state: filepath.Join(base, "state")}
	e.cfg = reflinkstore.Config{Root: root, StoreSize: 8 << 30, DefaultSize: 1 << 30, Discard: true}
	if mut != nil {
		mut(&e.cfg)
	}
	e.open(t)
	return e
}

// open (re)builds the store and driver on the same root, as a restarted plugin does: nothing is
// closed first, like after kill -9.
func (e *env) open(t *testing.T) {
	t.Helper()
	if e.store != nil {
		reflinkstore.StopSpareWorker(e.store) // as after kill -9: its goroutines are gone
	}
	cfg := e.cfg
	cfg.Log = testLog(t)
	s, err := reflinkstore.New(testCtx(t), cfg)
	if err != nil {
		t.Fatalf("reflinkstore.New: %v", err)
	}
	d, err := driver.New(testCtx(t), driver.Config{
		Backend: s, MountRoot: e.mnt, StateDir: e.state, DefaultSize: 1 << 30,
		ImportWait: 5 * time.Second, Log: cfg.Log,
	})
	if err != nil {
		t.Fatalf("driver.New: %v", err)
	}
	if e.store != nil {
		e.stale = append(e.stale, e.store)
	}
	e.store, e.d = s, d
}

// finish checks the test left no volume mounted, closes the store (unmounting its store file) and
// proves nothing is mounted or attached under the test's directory.
func (e *env) finish(t *testing.T) {
	t.Helper()
	for _, v := range e.d.List() {
		if v.Mounts > 0 {
			t.Fatalf("volume %s still mounted by %d callers at the end of the test", v.Name, v.Mounts)
		}
	}
	if err := e.store.Close(testCtx(t)); err != nil {
		t.Fatalf("Close: %v", err)
	}
	for _, s := range e.stale { // their root locks; their store file is already unmounted
		if err := s.Close(testCtx(t)); err != nil {
			t.Fatalf("Close of a replaced store: %v", err)
		}
	}
	// A native root's own filesystem is the test's, not the store's: only the store's objects
	// must be gone.
	assertNoLeaks(t, e.root)
	if mounts, _ := xfsutil.MountsUnder(e.mnt); len(mounts) > 0 {
		t.Fatalf("leaked mounts under the mount root: %+v", mounts)
	}
}
