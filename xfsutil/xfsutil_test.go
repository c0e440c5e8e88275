package xfsutil_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

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
// and 4096-byte sectors and blocks (pitfalls #14).
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
// filesystem mounted (no lazy detach, pitfalls #8).
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
