package bench

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/zgolden/zgolden/tests/harness"
)

// bed is one backend's test bed: the plugin serving it, an XFS for the old way (goldens as
// directory trees, copied with cp -a --reflink=auto), and the raw command sequence the plugin
// wraps, without the plugin.
type bed interface {
	backend() string
	where() string
	plugin() *plugin
	// oldDir is a directory on the old way's XFS: golden trees and their copies live there.
	oldDir() string
	// wsDir is where the workspace baseline's git clones go (a ZFS dataset, or the old XFS).
	wsDir() string
	// rawBlock is the raw create+mount of a type=block volume from generation source gen, timed
	// by the caller; steps are its parts' durations.
	rawBlock(gen, name, target string) (steps map[string]time.Duration, err error)
	// receiver starts a second plugin on a store of its own, as a second host's (the transfer
	// case): ZFS under a parent of its own, the reflink store on a root of its own.
	receiver(t testing.TB) *plugin
	// rawFS is the same for a type=fs volume.
	rawFS(gen, name, target string) error
	// rawCleanup unmounts and destroys what rawBlock or rawFS made.
	rawCleanup(name, target string) error
	// rawDestroy destroys an unmounted raw volume: the raw counterpart of Remove.
	rawDestroy(name string) error
	// settle flushes everything to the disks, so the next measurement starts quiet.
	settle()
	// diskWrites returns the bytes each device of interest has written so far.
	diskWrites() map[string]uint64
}

// run runs argv and returns its combined output, with the output in the error.
func run(name string, args ...string) (string, error) {
	out, err := harness.Output(name, args...)
	if err != nil {
		return out, fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(out))
	}
	return out, nil
}

func must(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := run(name, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// sectorsWritten reads field 7 of /sys/class/block/DEV/stat: 512-byte sectors written.
func sectorsWritten(dev string) uint64 {
	data, err := os.ReadFile(filepath.Join("/sys/class/block", filepath.Base(dev), "stat"))
	if err != nil {
		return 0
	}
	f := strings.Fields(string(data))
	if len(f) < 7 {
		return 0
	}
	n, _ := strconv.ParseUint(f[6], 10, 64)
	return n * 512
}

// unmountRetry unmounts target, retrying while udev or blkid still hold the device.
func unmountRetry(target string) error {
	var err error
	for i := 0; i < 40; i++ {
		if _, err = run("umount", target); err == nil || strings.Contains(err.Error(), "not mounted") {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return err
}

// ---- ZFS, in the guest -------------------------------------------------------------------

type zfsBed struct {
	t       testing.TB
	pool    string
	parent  string // the bench's dataset; the plugin's parent is parent/zg
	dir     string
	p       *plugin
	poolDev string
	oldDev  string
}

func newZFSBed(t testing.TB, dir string) *zfsBed {
	pool := harness.RequireZFS(t)
	parent := harness.ZFSParent(t)
	b := &zfsBed{t: t, pool: pool, parent: parent, dir: dir}
	must(t, "zfs", "create", "-o", "mountpoint=none", "-o", "dedup=off", parent)
	must(t, "zfs", "create", "-o", "mountpoint=none", parent+"/raw")
	// The old way: one big zvol with XFS (mkfs.xfs defaults), golden directories and session
	// copies side by side on it. dedup=off here; the dedup=on run is the write-amplification case.
	b.oldDev = b.makeOldFS(t, "old", "off", filepath.Join(dir, "old"))
	must(t, "zfs", "create", "-o", "dedup=off", "-o", "mountpoint="+filepath.Join(dir, "ws"), parent+"/ws")
	b.poolDev = poolDevice(t, pool)
	b.p = startPlugin(t, filepath.Join(dir, "plugin"), "--backend", "zfs", "--parent", parent+"/zg")
	return b
}

func (b *zfsBed) receiver(t testing.TB) *plugin {
	return startPlugin(t, filepath.Join(b.dir, "receiver"), "--backend", "zfs", "--parent", b.parent+"/zg2")
}

// makeOldFS makes a sparse zvol with the given dedup setting, formats it with mkfs.xfs's
// defaults (reflink=1) as the old system did, mounts it at mnt and returns the zvol's device.
func (b *zfsBed) makeOldFS(t testing.TB, name, dedup, mnt string) string {
	ds := b.parent + "/" + name
	must(t, "zfs", "create", "-s", "-V", "200G", "-o", "dedup="+dedup, ds)
	dev, err := waitDevice("/dev/zvol/"+ds, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	must(t, "mkfs.xfs", "-q", "-f", "-K", dev)
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	must(t, "mount", "-t", "xfs", dev, mnt)
	t.Cleanup(func() { _ = unmountRetry(mnt) })
	real, _ := filepath.EvalSymlinks(dev)
	return real
}

func poolDevice(t testing.TB, pool string) string {
	out := must(t, "zpool", "list", "-v", "-H", "-P", pool)
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) > 0 && strings.HasPrefix(f[0], "/dev/") {
			real, err := filepath.EvalSymlinks(f[0])
			if err == nil {
				return real
			}
			return f[0]
		}
	}
	t.Fatalf("no vdev in zpool list -v -P %s:\n%s", pool, out)
	return ""
}

// waitZvol waits for a zvol's device as the plugin does: the udev link, polled every 5 ms, and
// after 3 s (udev lags far behind when dozens of zvols appear at once under emulation) the
// /dev/zdN node whose BLKZNAME ioctl names the dataset.
func waitZvol(ds string, timeout time.Duration) (string, error) {
	link := "/dev/zvol/" + ds
	start := time.Now()
	for {
		if fi, err := os.Stat(link); err == nil && fi.Mode()&os.ModeDevice != 0 {
			return link, nil
		}
		if time.Since(start) > 3*time.Second {
			if dev := zvolByName(ds); dev != "" {
				return dev, nil
			}
		}
		if time.Since(start) > timeout {
			return "", fmt.Errorf("zvol %s: no device within %s", ds, timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// zvolByName returns the /dev/zdN whose BLKZNAME (_IOR(0x12, 125, char[256])) is ds, or "".
func zvolByName(ds string) string {
	entries, _ := os.ReadDir("/sys/block")
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), "zd") {
			continue
		}
		fd, err := unix.Open("/dev/"+e.Name(), unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
		if err != nil {
			continue
		}
		var name [256]byte
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), 0x8100127D, uintptr(unsafe.Pointer(&name[0])))
		unix.Close(fd)
		if errno == 0 && unix.ByteSliceToString(name[:]) == ds {
			return "/dev/" + e.Name()
		}
	}
	return ""
}

func waitDevice(path string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		if fi, err := os.Stat(path); err == nil && fi.Mode()&os.ModeDevice != 0 {
			return path, nil
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("device %s did not appear within %s", path, timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (b *zfsBed) backend() string       { return "zfs" }
func (b *zfsBed) where() string         { return "guest (qemu TCG)" }
func (b *zfsBed) plugin() *plugin       { return b.p }
func (b *zfsBed) oldDir() string        { return filepath.Join(b.dir, "old") }
func (b *zfsBed) wsDir() string         { return filepath.Join(b.dir, "ws") }
func (b *zfsBed) rawDS(n string) string { return b.parent + "/raw/" + n }

func (b *zfsBed) rawBlock(gen, name, target string) (map[string]time.Duration, error) {
	steps := map[string]time.Duration{}
	ds := b.rawDS(name)
	t0 := time.Now()
	if _, err := run("zfs", "clone", "-o", "dedup=off", gen, ds); err != nil {
		return nil, err
	}
	t1 := time.Now()
	dev, err := waitZvol(ds, 5*time.Minute)
	if err != nil {
		return nil, err
	}
	t2 := time.Now()
	if err := os.MkdirAll(target, 0o755); err != nil {
		return nil, err
	}
	// A burst of concurrent zvol opens can fail with ERESTARTSYS, "Unknown error 512" (openzfs
	// #12301): the raw sequence retries it as zgolden's mount does (xfsutil.ErrContended), or
	// it would be a floor that fails where the plugin works.
	for pause := 50 * time.Millisecond; ; pause = min(2*pause, 2500*time.Millisecond) {
		_, err := run("mount", "-t", "xfs", "-o", "nouuid,discard", dev, target)
		if err == nil {
			break
		}
		if !strings.Contains(err.Error(), "Unknown error 512") || time.Since(t2) > time.Minute {
			return nil, err
		}
		time.Sleep(pause)
	}
	t3 := time.Now()
	steps["clone"], steps["device"], steps["mount"] = t1.Sub(t0), t2.Sub(t1), t3.Sub(t2)
	return steps, nil
}

func (b *zfsBed) rawFS(gen, name, target string) error {
	ds := b.rawDS(name)
	if _, err := run("zfs", "clone", "-o", "dedup=off", "-o", "mountpoint=legacy", gen, ds); err != nil {
		return err
	}
	if err := os.MkdirAll(target, 0o755); err != nil {
		return err
	}
	_, err := run("mount", "-t", "zfs", ds, target)
	return err
}

func (b *zfsBed) rawCleanup(name, target string) error {
	if err := unmountRetry(target); err != nil {
		return err
	}
	if err := b.rawDestroy(name); err != nil {
		return err
	}
	return os.Remove(target)
}

func (b *zfsBed) rawDestroy(name string) error {
	var err error
	for i := 0; i < 40; i++ { // udev may still probe the device for a moment
		if _, err = run("zfs", "destroy", b.rawDS(name)); err == nil {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return err
}

const freeMinTime = "/sys/module/zfs/parameters/zfs_free_min_time_ms"

func (b *zfsBed) setFreeMinTime(ms string) (string, error) {
	old, err := os.ReadFile(freeMinTime)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(old)), os.WriteFile(freeMinTime, []byte(ms), 0o644)
}

func (b *zfsBed) settle() {
	unix.Sync()
	_, _ = run("zpool", "sync", b.pool)
}

func (b *zfsBed) diskWrites() map[string]uint64 {
	return map[string]uint64{"pool": sectorsWritten(b.poolDev)}
}

func (b *zfsBed) ddtEntries() (uint64, string) {
	out, _ := run("zpool", "status", "-D", b.pool)
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		if !strings.HasPrefix(line, "dedup:") {
			continue
		}
		if strings.Contains(line, "no DDT entries") {
			return 0, line
		}
		f := strings.Fields(strings.ReplaceAll(line, ",", ""))
		for i := 0; i+2 < len(f); i++ {
			if f[i] == "DDT" && f[i+1] == "entries" {
				n, _ := strconv.ParseUint(f[i+2], 10, 64)
				return n, line
			}
		}
		return 0, line
	}
	return 0, "no dedup line"
}

// ---- reflink, on the host ------------------------------------------------------------------

type reflinkBed struct {
	t        testing.TB
	dir      string
	p        *plugin
	storeDir string
	rawDir   string
	storeDev string
	oldDev   string
}

func (b *reflinkBed) receiver(t testing.TB) *plugin {
	return startReflinkPlugin(t, filepath.Join(b.dir, "receiver"), filepath.Join(b.dir, "root2"))
}

// startReflinkPlugin starts a plugin on the reflink store at root, and unmounts the store when
// the test is done.
func startReflinkPlugin(t testing.TB, dir, root string) *plugin {
	// The store stays mounted when the plugin stops (so do its volumes): unmount it after the
	// plugin is gone (cleanups run last-registered first), or it leaks a loop device and the
	// deleted store file's space.
	t.Cleanup(func() {
		if err := unmountRetry(filepath.Join(root, "store")); err != nil {
			t.Errorf("unmount the bench's reflink store: %v", err)
		}
	})
	return startPlugin(t, dir, "--backend", "reflink", "--root", root, "--store-size", "400G")
}

func newReflinkBed(t testing.TB, dir string) *reflinkBed {
	harness.RequireTools(t, "mkfs.xfs", "cp", "git")
	b := &reflinkBed{t: t, dir: dir}
	// The old way: an XFS (reflink=1) on its own block device, here a loop device over a
	// sparse file, as the plugin's own store is when its root is not XFS.
	img := filepath.Join(dir, "old.img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(400 << 30); err != nil {
		t.Fatal(err)
	}
	f.Close()
	must(t, "mkfs.xfs", "-q", "-f", "-K", "-m", "reflink=1", img)
	if err := os.MkdirAll(b.oldDir(), 0o755); err != nil {
		t.Fatal(err)
	}
	must(t, "mount", "-o", "loop", img, b.oldDir())
	t.Cleanup(func() { _ = unmountRetry(b.oldDir()) })
	b.oldDev = loopOf(img)
	if err := os.MkdirAll(b.wsDir(), 0o755); err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(dir, "root")
	b.p = startReflinkPlugin(t, filepath.Join(dir, "plugin"), root)
	b.storeDir = filepath.Join(root, "store")
	b.rawDir = filepath.Join(b.storeDir, ".bench-raw")
	if err := os.MkdirAll(b.rawDir, 0o755); err != nil {
		t.Fatal(err)
	}
	b.storeDev = loopOf(filepath.Join(root, "store.img"))
	if b.storeDev == "" {
		t.Logf("the reflink store is not a loop-mounted file (its root can reflink): store writes are not measured")
	}
	return b
}

// loopOf returns the loop device (loopN) attached to file, or "".
func loopOf(file string) string {
	real, err := filepath.EvalSymlinks(file)
	if err != nil {
		return ""
	}
	paths, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, p := range paths {
		data, err := os.ReadFile(p)
		if err == nil && strings.TrimSpace(string(data)) == real {
			return filepath.Base(filepath.Dir(filepath.Dir(p)))
		}
	}
	return ""
}

func (b *reflinkBed) backend() string { return "reflink" }
func (b *reflinkBed) where() string   { return "host" }
func (b *reflinkBed) plugin() *plugin { return b.p }
func (b *reflinkBed) oldDir() string  { return filepath.Join(b.dir, "old") }
func (b *reflinkBed) wsDir() string   { return filepath.Join(b.oldDir(), "ws") }

func (b *reflinkBed) rawBlock(gen, name, target string) (map[string]time.Duration, error) {
	steps := map[string]time.Duration{}
	t0 := time.Now()
	img := filepath.Join(b.rawDir, name+".img")
	src, err := os.Open(gen)
	if err != nil {
		return nil, err
	}
	defer src.Close()
	dst, err := os.OpenFile(img, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return nil, err
	}
	if err := unix.IoctlFileClone(int(dst.Fd()), int(src.Fd())); err != nil {
		dst.Close()
		return nil, fmt.Errorf("FICLONE %s: %w", gen, err)
	}
	if err := dst.Close(); err != nil {
		return nil, err
	}
	t1 := time.Now()
	if err := os.MkdirAll(target, 0o755); err != nil {
		return nil, err
	}
	if _, err := run("mount", "-t", "xfs", "-o", "loop,nouuid,discard", img, target); err != nil {
		return nil, err
	}
	t2 := time.Now()
	steps["ficlone"], steps["loop+mount"] = t1.Sub(t0), t2.Sub(t1)
	return steps, nil
}

func (b *reflinkBed) rawFS(gen, name, target string) error {
	_, err := b.rawBlock(gen, name, target)
	return err
}

func (b *reflinkBed) rawCleanup(name, target string) error {
	if err := unmountRetry(target); err != nil {
		return err
	}
	if err := b.rawDestroy(name); err != nil {
		return err
	}
	return os.Remove(target)
}

func (b *reflinkBed) rawDestroy(name string) error {
	img := filepath.Join(b.rawDir, name+".img")
	// autoclear detaches the loop device after the unmount, asynchronously.
	for i := 0; i < 100 && loopOf(img) != ""; i++ {
		time.Sleep(10 * time.Millisecond)
	}
	if err := os.Remove(img); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

func (b *reflinkBed) settle() { unix.Sync() }

func (b *reflinkBed) diskWrites() map[string]uint64 {
	m := map[string]uint64{"old_xfs": sectorsWritten(b.oldDev)}
	if b.storeDev != "" {
		m["store_xfs"] = sectorsWritten(b.storeDev)
	}
	return m
}
