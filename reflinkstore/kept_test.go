package reflinkstore_test

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/zgolden/zgolden/reflinkstore"
	"github.com/zgolden/zgolden/tests/harness"
	"github.com/zgolden/zgolden/xfsutil"
)

// devOf is the device number of the filesystem at path.
func devOf(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Dev
}

// TestUnmountKeepsTheXFSMounted follows one volume through kept.go's life: its Unmount leaves
// the XFS mounted at its kept mount, a later Mount binds that same XFS, a fork of it taken while
// only the kept mount holds it has what the container wrote, and its Remove unmounts it before
// the unlink, so that a new volume of the same name gets an XFS of its own.
func TestUnmountKeepsTheXFSMounted(t *testing.T) {
	base := newBase(t)
	e := newEnv(t, base, filepath.Join(base, "zg"), nil)
	e.importTree(t, "prj")
	e.create(t, "v", map[string]string{"golden": "prj"})
	mp := e.mount(t, "v", "c1")
	// Not synced: what the container wrote last is in the page cache when Docker unmounts.
	writeFile(t, filepath.Join(mp, "written"), "before-unmount")
	e.unmount(t, "v", "c1")

	if ok, _ := xfsutil.IsMountpoint(mp); ok {
		t.Fatal("Docker's mountpoint is still mounted after Unmount")
	}
	kept := keptMounts(t, e)
	if len(kept) != 1 {
		t.Fatalf("kept mounts after Unmount: %v, want one", kept)
	}
	if st, err := e.store.Status(testCtx(t)); err != nil || st.KeptMounted != 1 {
		t.Fatalf("status after Unmount: kept_mounted %d (%v), want 1", st.KeptMounted, err)
	}
	if got := readFile(t, filepath.Join(kept[0], "written")); got != "before-unmount" {
		t.Fatalf("the kept mount reads %q", got)
	}
	assertNoImageLoops(t, e)

	// A fork freezes the kept mount, so the reflink of the image carries the page cache's data.
	e.create(t, "f", map[string]string{"from": "v"})
	fmp := e.mount(t, "f", "c2")
	if got := readFile(t, filepath.Join(fmp, "written")); got != "before-unmount" {
		t.Fatalf("a fork of a volume held only by its kept mount reads %q, want before-unmount", got)
	}
	e.unmount(t, "f", "c2")

	// The next Mount is a bind of the kept XFS: the same device, the same files.
	mp = e.mount(t, "v", "c3")
	if devOf(t, mp) != devOf(t, kept[0]) {
		t.Fatal("the second Mount did not bind the kept mount")
	}
	if got := readFile(t, filepath.Join(mp, "written")); got != "before-unmount" {
		t.Fatalf("the second Mount reads %q", got)
	}
	e.unmount(t, "v", "c3")
	if got := keptMounts(t, e); !slices.Contains(got, kept[0]) || len(got) != 2 {
		t.Fatalf("kept mounts after the second Unmount: %v, want %s and the fork's", got, kept[0])
	}

	// Remove returns before the kept mount's unmount; once the image is unlinked, it is gone.
	e.remove(t, "v")
	harness.ReflinkUnlinked(t, filepath.Join(e.root, "store"))
	if got := keptMounts(t, e); slices.Contains(got, kept[0]) {
		t.Fatalf("the removed volume's kept mount %s is still mounted: %v", kept[0], got)
	}
	if _, err := os.Stat(kept[0]); !os.IsNotExist(err) {
		t.Fatalf("the removed volume's kept mount left its directory: %v", err)
	}

	e.create(t, "v", map[string]string{"golden": "prj"})
	mp = e.mount(t, "v", "c4")
	if _, err := os.Stat(filepath.Join(mp, "written")); !os.IsNotExist(err) {
		t.Fatalf("a new volume of a removed one's name sees the removed one's file: %v", err)
	}
	e.unmount(t, "v", "c4")
	e.remove(t, "v")
	e.remove(t, "f")
	harness.ReflinkUnlinked(t, filepath.Join(e.root, "store"))
	if got := keptMounts(t, e); len(got) > 0 {
		t.Fatalf("kept mounts after every volume was removed: %v", got)
	}
	e.finish(t)
}

// TestStartUnmountsTheKeptMountOfARemovedVolume: a crash after a Remove's rename, before its
// background unmount, leaves a kept mount on a renamed image. The next start unmounts it and
// deletes the image, and keeps the kept mount of a volume that still exists.
func TestStartUnmountsTheKeptMountOfARemovedVolume(t *testing.T) {
	base := newBase(t)
	e := newEnv(t, base, filepath.Join(base, "zg"), nil)
	e.create(t, "gone", nil)
	e.create(t, "stays", nil)
	for _, v := range []string{"gone", "stays"} {
		writeFile(t, filepath.Join(e.mount(t, v, "c"), "f"), v)
		e.unmount(t, v, "c")
	}
	if got := keptMounts(t, e); len(got) != 2 {
		t.Fatalf("kept mounts: %v, want two", got)
	}
	// What Remove's rename leaves (reflinkstore's removedName), with the plugin killed after it.
	vols := filepath.Join(e.root, "store", "volumes")
	if err := os.Rename(filepath.Join(vols, "gone.img"), filepath.Join(vols, ".tmp-removed.gone-1.img")); err != nil {
		t.Fatal(err)
	}

	e.open(t)
	got := keptMounts(t, e)
	if len(got) != 1 {
		t.Fatalf("kept mounts after the restart: %v, want the remaining volume's only", got)
	}
	if entries, _ := os.ReadDir(vols); len(entries) != 1 || entries[0].Name() != "stays.img" {
		t.Fatalf("volume images after the restart: %v, want stays.img only", entries)
	}
	assertNoImageLoops(t, e)
	mp := e.mount(t, "stays", "c")
	if devOf(t, mp) != devOf(t, got[0]) || readFile(t, filepath.Join(mp, "f")) != "stays" {
		t.Fatal("after the restart, Mount did not bind the remaining volume's kept mount")
	}
	e.unmount(t, "stays", "c")
	e.finish(t) // Close unmounts the kept mount
}

// TestUnmountOfABusyMountpointKeepsNothing: with a process's file open in Docker's mountpoint,
// Unmount fails busy as before, the volume stays mounted there and no kept mount is left beside it.
func TestUnmountOfABusyMountpointKeepsNothing(t *testing.T) {
	base := newBase(t)
	e := newEnv(t, base, filepath.Join(base, "zg"), nil)
	e.create(t, "v", nil)
	mp := e.mount(t, "v", "c")
	f, err := os.Create(filepath.Join(mp, "open"))
	if err != nil {
		t.Fatal(err)
	}
	err = e.d.Unmount(testCtx(t), "v", "c")
	if err == nil || !strings.Contains(err.Error(), "busy") {
		t.Fatalf("Unmount with a file open: %v, want busy", err)
	}
	if ok, _ := xfsutil.IsMountpoint(mp); !ok {
		t.Fatal("a failed Unmount unmounted Docker's mountpoint")
	}
	if got := keptMounts(t, e); len(got) > 0 {
		t.Fatalf("a failed Unmount left kept mounts: %v", got)
	}
	f.Close()
	e.unmount(t, "v", "c")
	e.remove(t, "v")
	e.finish(t)
}

// TestStopUnmountsTheKeptMounts: a plugin's stop (Stop) lets a Remove that has just returned
// finish its unmount and unlink, and unmounts the kept mounts of the volumes that stay, and the
// spares', so that nothing Docker did not ask for stays mounted; the next start carries on.
func TestStopUnmountsTheKeptMounts(t *testing.T) {
	base := newBase(t)
	e := newEnv(t, base, filepath.Join(base, "zg"), func(c *reflinkstore.Config) { c.Spares = 1 })
	e.importTree(t, "prj")
	waitSpares(t, e, "prj", 1)
	for _, v := range []string{"gone", "stays"} {
		e.create(t, v, nil)
		writeFile(t, filepath.Join(e.mount(t, v, "c"), "f"), v)
		e.unmount(t, v, "c")
	}
	e.remove(t, "gone")
	if err := e.store.Stop(testCtx(t)); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if got := keptMounts(t, e); len(got) > 0 {
		t.Fatalf("kept mounts after Stop: %v", got)
	}
	if entries, _ := os.ReadDir(filepath.Join(e.root, "store", "volumes")); len(entries) != 1 || entries[0].Name() != "stays.img" {
		t.Fatalf("volume images after Stop: %v, want stays.img only (the removal finished)", entries)
	}
	if loops := loopsUnder(filepath.Join(e.root, "store")); len(loops) > 0 {
		t.Fatalf("loop devices still attached to images after Stop: %+v", loops)
	}
	e.open(t)
	waitSpares(t, e, "prj", 1) // the start mounts the spare again
	if got := readFile(t, filepath.Join(e.mount(t, "stays", "c"), "f")); got != "stays" {
		t.Fatalf("after Stop and a start, stays reads %q", got)
	}
	e.unmount(t, "stays", "c")
	e.remove(t, "stays")
	e.finish(t)
}
