package xfsutil_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/zgolden/zgolden/driver/drivertest"
	"github.com/zgolden/zgolden/tests/harness"
	"github.com/zgolden/zgolden/xfsutil"
)

// image makes a sparse image file formatted by xfsutil.Mkfs, and a reflink copy of it, which
// carries the same XFS UUID as a zvol clone carries its golden's.
func images(t *testing.T) (orig, clone string) {
	t.Helper()
	harness.RequireRoot(t)
	harness.RequireTools(t, "mkfs.xfs", "xfs_freeze", "losetup")
	dir := harness.LoopFS(t, "xfs", 4<<30) // XFS with reflink=1, so the copy is a reflink
	orig = filepath.Join(dir, "orig.img")
	f, err := os.Create(orig)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(1 << 30); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := xfsutil.Mkfs(context.Background(), orig, "zgolden"); err != nil {
		t.Fatal(err)
	}
	clone = filepath.Join(dir, "clone.img")
	harness.Run(t, "cp", "--reflink=always", orig, clone)
	return orig, clone
}

func mountLoop(t *testing.T, img string, opts []string) (string, error) {
	t.Helper()
	mp := filepath.Join(t.TempDir(), "m")
	err := xfsutil.Mount(context.Background(), img, mp, append([]string{"loop"}, opts...))
	if err == nil {
		t.Cleanup(func() {
			if err := xfsutil.Unmount(context.Background(), mp); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		})
	}
	return mp, err
}

// TestDuplicateUUIDNeedsNouuid proves pitfall #1 on the real kernel: a second XFS with the same
// UUID does not mount without nouuid, and does with zgolden's mount options.
func TestDuplicateUUIDNeedsNouuid(t *testing.T) {
	orig, clone := images(t)
	if _, err := mountLoop(t, orig, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := mountLoop(t, clone, nil); err == nil {
		t.Fatal("the kernel mounted a second XFS with the same UUID without nouuid; the test proves nothing")
	}
	mp, err := mountLoop(t, clone, xfsutil.MountOptions(true))
	if err != nil {
		t.Fatalf("mount with nouuid,discard: %v", err)
	}
	m, err := xfsutil.MountedAt(mp)
	if err != nil || m == nil || m.FSType != "xfs" || !strings.Contains(m.Options, "nouuid") || !strings.Contains(m.Options, "discard") {
		t.Fatalf("mount table entry = %+v, %v", m, err)
	}
}

// TestMkfsForOverlay2 checks the filesystem Mkfs makes: d_type (ftype=1), which overlay2 needs,
// and 4096-byte sectors and blocks (docs/design-facts.md, "Sector size on 8K zvols").
func TestMkfsForOverlay2(t *testing.T) {
	orig, _ := images(t)
	mp, err := mountLoop(t, orig, xfsutil.MountOptions(false))
	if err != nil {
		t.Fatal(err)
	}
	out := harness.Run(t, "xfs_info", mp)
	for _, want := range []string{"ftype=1", "sectsz=4096", "bsize=4096"} {
		if !strings.Contains(out, want) {
			t.Errorf("xfs_info lacks %s:\n%s", want, out)
		}
	}
}

// TestBusyUnmountIsReported: a held file makes Unmount fail with ErrBusy and leaves the
// filesystem mounted (no lazy detach, docs/design-facts.md, "Busy devices").
func TestBusyUnmountIsReported(t *testing.T) {
	orig, _ := images(t)
	mp := filepath.Join(t.TempDir(), "m")
	ctx := context.Background()
	if err := xfsutil.Mount(ctx, orig, mp, []string{"loop", "nouuid"}); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(filepath.Join(mp, "held"))
	if err != nil {
		t.Fatal(err)
	}
	err = xfsutil.UnmountRetry(ctx, mp, 2)
	if !errors.Is(err, xfsutil.ErrBusy) || !strings.Contains(err.Error(), "fuser") {
		t.Fatalf("busy unmount: err = %v, want ErrBusy with advice", err)
	}
	if m, _ := xfsutil.MountedAt(mp); m == nil {
		t.Fatal("a busy unmount detached the filesystem")
	}
	f.Close()
	if err := xfsutil.Unmount(ctx, mp); err != nil {
		t.Fatal(err)
	}
	if m, _ := xfsutil.MountedAt(mp); m != nil {
		t.Fatal("still mounted")
	}
}

// TestFreezeThaw: a frozen filesystem is read-only-consistent and thaws back to writable.
func TestFreezeThaw(t *testing.T) {
	orig, _ := images(t)
	mp, err := mountLoop(t, orig, xfsutil.MountOptions(false))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := xfsutil.Freeze(ctx, mp); err != nil {
		t.Fatal(err)
	}
	if err := xfsutil.Freeze(ctx, mp); err == nil {
		t.Error("freezing a frozen filesystem succeeded; the freeze did not take")
	}
	if err := xfsutil.Thaw(ctx, mp); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(mp, "after-thaw"), []byte("x"), 0o644); err != nil {
		t.Fatalf("write after thaw: %v", err)
	}
}

// TestFrozen: act runs with the filesystem frozen, and it is thawed after, when act fails too.
func TestFrozen(t *testing.T) {
	orig, _ := images(t)
	mp, err := mountLoop(t, orig, xfsutil.MountOptions(false))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	actErr := errors.New("the snapshot failed")
	for _, fail := range []bool{false, true} {
		ran := false
		err := xfsutil.Frozen(ctx, mp, func() error {
			ran = true
			if xfsutil.Freeze(ctx, mp) == nil {
				t.Error("the filesystem is not frozen while act runs")
			}
			if fail {
				return actErr
			}
			return nil
		})
		if !ran || fail != errors.Is(err, actErr) || !fail && err != nil {
			t.Fatalf("Frozen (act fails: %v) = %v, ran %v", fail, err, ran)
		}
		if err := os.WriteFile(filepath.Join(mp, "after"), []byte("x"), 0o644); err != nil {
			t.Fatalf("write after Frozen (act fails: %v): %v; the filesystem was left frozen", fail, err)
		}
	}
	if err := xfsutil.Frozen(ctx, "", func() error { return actErr }); !errors.Is(err, actErr) {
		t.Fatalf("Frozen with nothing mounted = %v; want act's error", err)
	}
}

// TestCopyTreePreservesEverything: cp -a semantics (hard links, symlinks, xattrs, ownership,
// modes, sparse files) into a fresh XFS, with progress reported.
func TestCopyTreePreservesEverything(t *testing.T) {
	orig, _ := images(t)
	mp, err := mountLoop(t, orig, xfsutil.MountOptions(false))
	if err != nil {
		t.Fatal(err)
	}
	src := t.TempDir()
	drivertest.MakeTree(t, src)
	size, err := xfsutil.Scan(context.Background(), src)
	if err != nil {
		t.Fatal(err)
	}
	if size.Files < drivertest.TreeFiles || size.Bytes < 64<<20 {
		t.Fatalf("Scan = %+v", size)
	}
	var lastFiles int64
	err = xfsutil.CopyTree(context.Background(), src, mp, func(files, bytes int64) { lastFiles = files })
	if err != nil {
		t.Fatal(err)
	}
	if lastFiles < drivertest.TreeFiles {
		t.Fatalf("progress reported %d inodes, want at least %d", lastFiles, drivertest.TreeFiles)
	}
	drivertest.CheckTree(t, mp)
}

// TestVerifyTreeCatchesDifferences: each kind of difference VerifyTree is meant to catch fails it.
func TestVerifyTreeCatchesDifferences(t *testing.T) {
	harness.RequireRoot(t)
	for name, spoil := range map[string]func(dst string) error{
		"missing file": func(d string) error { return os.Remove(filepath.Join(d, "layers/d03/f0003")) },
		"size":         func(d string) error { return os.WriteFile(filepath.Join(d, "layers/d03/f0003"), []byte("x"), 0o644) },
		"mode":         func(d string) error { return os.Chmod(filepath.Join(d, "README"), 0o600) },
		"owner":        func(d string) error { return os.Lchown(filepath.Join(d, "README"), 1, 1) },
		"symlink": func(d string) error {
			os.Remove(filepath.Join(d, "link"))
			return os.Symlink("elsewhere", filepath.Join(d, "link"))
		},
		"xattr": func(d string) error {
			return unix.Setxattr(filepath.Join(d, "README"), "user.zgolden", []byte("other"), 0)
		},
		"hard link": func(d string) error {
			// A separate file identical in everything but its inode.
			p := filepath.Join(d, "README.hard")
			tmp := filepath.Join(d, "tmp")
			harness.Run(t, "cp", "-a", p, tmp)
			return os.Rename(tmp, p)
		},
	} {
		t.Run(name, func(t *testing.T) {
			src, dst := t.TempDir(), t.TempDir()
			drivertest.MakeTree(t, src)
			harness.Run(t, "cp", "-a", src+"/.", dst)
			if err := xfsutil.VerifyTree(context.Background(), src, dst); err != nil {
				t.Fatalf("an exact copy does not verify: %v", err)
			}
			if err := spoil(dst); err != nil {
				t.Fatal(err)
			}
			if err := xfsutil.VerifyTree(context.Background(), src, dst); err == nil {
				t.Fatalf("VerifyTree accepted a copy with a different %s", name)
			}
		})
	}
}

// TestLoopBacksAfterItsMountIsGone is a managed plugin's restart: the loop device behind the
// reflink store was attached through a mount that no longer exists (the old plugin's namespace),
// so the kernel's backing_file no longer names the file's path. The device must still be known
// as the file's, and only as that file's.
func TestLoopBacksAfterItsMountIsGone(t *testing.T) {
	orig, clone := images(t)
	bind := filepath.Join(t.TempDir(), "bind")
	if err := os.Mkdir(bind, 0o755); err != nil {
		t.Fatal(err)
	}
	harness.Run(t, "mount", "--bind", filepath.Dir(orig), bind)
	dev := strings.TrimSpace(harness.Run(t, "losetup", "--find", "--show", filepath.Join(bind, filepath.Base(orig))))
	t.Cleanup(func() { _, _ = harness.Output("losetup", "--detach", dev) })
	harness.Run(t, "umount", "--lazy", bind)

	l, err := xfsutil.LoopOf(dev)
	if err != nil {
		t.Fatal(err)
	}
	if l.BackingFile == orig || l.BackingFile == "" {
		t.Fatalf("the kernel reports %s's backing file as %q: the test needs a path other than %s", dev, l.BackingFile, orig)
	}
	t.Logf("%s: backing_file reads %q once its mount is gone", dev, l.BackingFile)
	if !l.Backs(orig) {
		t.Fatalf("%s (backing_file %q) is not recognised as attached to %s", dev, l.BackingFile, orig)
	}
	if l.Backs(clone) {
		t.Fatalf("%s is taken for attached to %s, another file", dev, clone)
	}
	sameName := filepath.Join(t.TempDir(), filepath.Base(orig))
	if err := os.WriteFile(sameName, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if l.Backs(sameName) {
		t.Fatalf("%s is taken for attached to %s, another file of the same name", dev, sameName)
	}
	if ok, err := xfsutil.DetachLoop(dev, clone); err != nil || ok {
		t.Fatalf("DetachLoop(%s, %s) = %v, %v: it must leave another file's device alone", dev, clone, ok, err)
	}
	if ok, err := xfsutil.DetachLoop(dev, orig); err != nil || !ok {
		t.Fatalf("DetachLoop(%s, %s) = %v, %v: want it detached", dev, orig, ok, err)
	}
}

// loopsOf lists the loop devices attached to file, waiting up to 5 s for autoclear, which the
// kernel finishes asynchronously after the last close, to detach them when want is 0.
// loopsOf lists the loop devices backed by file now: Mount and Unmount return with the devices
// attached or released, so there is nothing to wait for.
func loopsOf(t *testing.T, file string) []string {
	t.Helper()
	loops, err := xfsutil.Loops()
	if err != nil {
		t.Fatal(err)
	}
	var devs []string
	for _, l := range loops {
		if l.Backs(file) {
			devs = append(devs, l.Device)
		}
	}
	return devs
}

// loopMounted mounts a fresh image through Mount's own loop device and returns the image, the
// mountpoint and the one device that backs it.
func loopMounted(t *testing.T) (img, mp, dev string) {
	t.Helper()
	img, _ = images(t)
	mp = filepath.Join(t.TempDir(), "m")
	if err := xfsutil.Mount(context.Background(), img, mp, []string{"loop", "nouuid"}); err != nil {
		t.Fatal(err)
	}
	devs := loopsOf(t, img)
	if len(devs) != 1 {
		t.Fatalf("after the mount, loop devices backed by %s: %v; want one", img, devs)
	}
	return img, mp, devs[0]
}

// TestLoopMountLeavesNoDevice: Mount attaches its own loop device (no mount(8)), with autoclear,
// so unmounting frees it, and a mount that fails frees it at once, with an error that names the
// image and says where the kernel's reason is.
func TestLoopMountLeavesNoDevice(t *testing.T) {
	orig, mp, dev := loopMounted(t)
	ctx := context.Background()
	if m, _ := xfsutil.MountedAt(mp); m == nil || m.Source != dev || m.FSType != "xfs" {
		t.Fatalf("mount table entry = %+v; want xfs on %s", m, dev)
	}
	if err := os.WriteFile(filepath.Join(mp, "f"), []byte("data"), 0o644); err != nil {
		t.Fatalf("the loop mount is not writable: %v", err)
	}
	if err := xfsutil.Unmount(ctx, mp); err != nil {
		t.Fatal(err)
	}
	if devs := loopsOf(t, orig); len(devs) != 0 {
		t.Fatalf("unmount left loop devices attached to %s: %v (autoclear not set?)", orig, devs)
	}
	if err := xfsutil.Unmount(ctx, mp); err == nil || !strings.Contains(err.Error(), "not a mount point") {
		t.Fatalf("second unmount: %v; want an error saying it is not a mount point", err)
	}

	junk := filepath.Join(filepath.Dir(orig), "junk.img")
	if err := os.WriteFile(junk, make([]byte, 64<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	err := xfsutil.Mount(ctx, junk, filepath.Join(t.TempDir(), "j"), []string{"loop", "nouuid"})
	if err == nil || !strings.Contains(err.Error(), junk) || !strings.Contains(err.Error(), "dmesg") {
		t.Fatalf("mounting an image without XFS: %v; want an error naming %s and pointing at dmesg", err, junk)
	}
	if devs := loopsOf(t, junk); len(devs) != 0 {
		t.Fatalf("a failed mount left loop devices attached to %s: %v", junk, devs)
	}
	err = xfsutil.Mount(ctx, filepath.Join(t.TempDir(), "missing.img"), filepath.Join(t.TempDir(), "x"), []string{"loop"})
	if !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("mounting a missing image: %v; want ErrNotExist", err)
	}
}

// TestUnmountWaitsForTheLoopDevice holds the loop device open, as udev's probe of a new device
// does, while Unmount runs: the kernel then detaches the device at that holder's close, after
// umount(2) has returned, and until it does the image is in use and the filesystem holding it
// cannot be unmounted. Unmount must return only once the device has let go (pitfall: the
// flake this came from was the outer filesystem's umount failing with "target is busy").
//
// The same holds for an XFS that has shut down (as one does when its device fails a write), which
// answers a stat of its root with EIO and so hides its device number from one.
func TestUnmountWaitsForTheLoopDevice(t *testing.T) {
	for _, shutDown := range []bool{false, true} {
		t.Run(map[bool]string{false: "mounted", true: "shut down"}[shutDown], func(t *testing.T) {
			unmountWaitsForTheLoopDevice(t, shutDown)
		})
	}
}

func unmountWaitsForTheLoopDevice(t *testing.T, shutDown bool) {
	orig, mp, dev := loopMounted(t)
	ctx := context.Background()
	if shutDown {
		if out, err := harness.Output("xfs_io", "-x", "-c", "shutdown", mp); err != nil {
			t.Fatalf("xfs_io shutdown: %v\n%s", err, out)
		}
		var st unix.Stat_t
		if err := unix.Stat(mp, &st); !errors.Is(err, unix.EIO) {
			t.Fatalf("stat of a shut-down XFS: %v; the case needs EIO", err)
		}
	}
	holder, err := unix.Open(dev, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	released := make(chan struct{})
	go func() {
		defer close(released)
		// Close only once the filesystem is gone, so the last close, and the detach, are ours,
		// and a while after (well inside Unmount's wait), so an Unmount that does not wait
		// returns first.
		for {
			if m, _ := xfsutil.MountedAt(mp); m == nil {
				break
			}
			time.Sleep(time.Millisecond)
		}
		time.Sleep(200 * time.Millisecond)
		unix.Close(holder)
	}()
	if err := xfsutil.Unmount(ctx, mp); err != nil {
		t.Fatal(err)
	}
	if devs := loopsOf(t, orig); len(devs) != 0 {
		t.Fatalf("Unmount returned with %s still attached to %s", devs, orig)
	}
	<-released
}

// TestConcurrentLoopMounts races attaches for free loop devices: LOOP_CTL_GET_FREE hands the
// same device to several callers, and all but one must retry on another.
func TestConcurrentLoopMounts(t *testing.T) {
	orig, _ := images(t)
	dir := filepath.Dir(orig)
	const n = 8
	imgs := make([]string, n)
	for i := range imgs {
		imgs[i] = filepath.Join(dir, "c"+strconv.Itoa(i)+".img")
		harness.Run(t, "cp", "--reflink=always", orig, imgs[i])
	}
	ctx := context.Background()
	errs := make(chan error, n)
	mps := make([]string, n)
	for i := range imgs {
		mps[i] = filepath.Join(t.TempDir(), "m")
		go func(i int) {
			errs <- xfsutil.Mount(ctx, imgs[i], mps[i], append([]string{"loop"}, xfsutil.MountOptions(false)...))
		}(i)
	}
	for range imgs {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	seen := map[string]string{}
	for i := range imgs {
		m, _ := xfsutil.MountedAt(mps[i])
		if m == nil {
			t.Errorf("%s is not mounted", mps[i])
			continue
		}
		if prev, ok := seen[m.Source]; ok {
			t.Errorf("%s and %s share loop device %s", prev, imgs[i], m.Source)
		}
		seen[m.Source] = imgs[i]
		if err := xfsutil.Unmount(ctx, mps[i]); err != nil {
			t.Error(err)
		}
	}
}

// TestMkfsFeatureSet: whatever mkfs.xfs this machine has (Debian 12's 6.1 on the host and the 2.1
// guest, Debian 13's 6.13 in the 2.3 and 2.4 guests), a volume gets the same on-disk features,
// the set Linux 6.1 mounts; so a golden made on any of them mounts on all of them.
func TestMkfsFeatureSet(t *testing.T) {
	orig, _ := images(t)
	out := harness.Run(t, "xfs_db", "-r", "-c", "version", orig)
	t.Logf("mkfs.xfs: %s; features: %s", strings.TrimSpace(harness.Run(t, "mkfs.xfs", "-V")), strings.TrimSpace(out))
	for _, want := range []string{"CRC", "FTYPE", "FINOBT", "SPARSE_INODES", "REFLINK", "INOBTCNT", "BIGTIME"} {
		if !strings.Contains(out, want) {
			t.Errorf("the XFS lacks %s: %s", want, out)
		}
	}
	for _, unwanted := range []string{"RMAPBT", "NREXT64", "EXCHANGE", "PARENT", "METADIR"} {
		if strings.Contains(out, unwanted) {
			t.Errorf("the XFS has %s, which Linux 6.1 does not mount (or only as experimental): %s", unwanted, out)
		}
	}
}

// TestIsMountpoint: on the real kernel, IsMountpoint agrees with the mount table for a device's
// mount, a bind of a directory of the same filesystem (which st_dev cannot tell), a directory that
// is not mounted, and one that does not exist.
func TestIsMountpoint(t *testing.T) {
	orig, _ := images(t)
	mp, err := mountLoop(t, orig, []string{"nouuid"})
	if err != nil {
		t.Fatal(err)
	}
	src, bind := filepath.Join(mp, "src"), filepath.Join(mp, "bind")
	for _, d := range []string{src, bind} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Mount(src, bind, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(bind, 0); err != nil {
			t.Errorf("cleanup: unmount %s: %v", bind, err)
		}
	})
	for _, c := range []struct {
		path string
		want bool
	}{{mp, true}, {bind, true}, {src, false}, {filepath.Join(mp, "missing"), false}} {
		got, err := xfsutil.IsMountpoint(c.path)
		if err != nil || got != c.want {
			t.Errorf("IsMountpoint(%s) = %v, %v; want %v", c.path, got, err, c.want)
		}
		if m, _ := xfsutil.MountedAt(c.path); (m != nil) != c.want {
			t.Errorf("the mount table disagrees about %s: %+v", c.path, m)
		}
	}
	// An XFS shut down (as one is when its thin zvol runs out of space) answers a stat of its
	// root with EIO, and its mountpoints are still mountpoints, to be unmounted.
	if out, err := harness.Output("xfs_io", "-x", "-c", "shutdown", mp); err != nil {
		t.Fatalf("xfs_io shutdown: %v\n%s", err, out)
	}
	var st unix.Stat_t
	if err := unix.Stat(mp, &st); !errors.Is(err, unix.EIO) {
		t.Fatalf("stat of a shut-down XFS: %v; the case below needs EIO", err)
	}
	for _, p := range []string{mp, bind} {
		if got, err := xfsutil.IsMountpoint(p); err != nil || !got {
			t.Errorf("IsMountpoint(%s) on a shut-down XFS = %v, %v; want true", p, got, err)
		}
	}
}
