package reflinkstore_test

import (
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/driver/drivertest"
	"github.com/zgolden/zgolden/reflinkstore"
	"github.com/zgolden/zgolden/tests/harness"
	"github.com/zgolden/zgolden/xfsutil"
)

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func (e *env) importTree(t *testing.T, project string) driver.Generation {
	t.Helper()
	src := t.TempDir()
	drivertest.MakeTree(t, src)
	var phases []string
	gen, err := e.d.Import(testCtx(t), project, driver.KindBlock, src, driver.ImportOptions{}, func(p driver.Progress) {
		if len(phases) == 0 || phases[len(phases)-1] != p.Phase {
			phases = append(phases, p.Phase)
		}
	})
	if err != nil {
		t.Fatalf("Import: %v", err)
	}
	if phases[len(phases)-1] != "done" {
		t.Fatalf("import progress phases = %v; want them to end with done", phases)
	}
	return gen
}

func (e *env) create(t *testing.T, name string, opts map[string]string) {
	t.Helper()
	if err := e.d.Create(testCtx(t), name, opts); err != nil {
		t.Fatalf("Create(%s, %v): %v", name, opts, err)
	}
}

func (e *env) mount(t *testing.T, name, id string) string {
	t.Helper()
	mp, err := e.d.Mount(testCtx(t), name, id)
	if err != nil {
		t.Fatalf("Mount(%s, %s): %v", name, id, err)
	}
	return mp
}

func (e *env) unmount(t *testing.T, name, id string) {
	t.Helper()
	if err := e.d.Unmount(testCtx(t), name, id); err != nil {
		t.Fatalf("Unmount(%s, %s): %v", name, id, err)
	}
}

func (e *env) remove(t *testing.T, name string) {
	t.Helper()
	if err := e.d.Remove(testCtx(t), name); err != nil {
		t.Fatalf("Remove(%s): %v", name, err)
	}
}

func (e *env) usage(t *testing.T, name string) driver.Usage {
	t.Helper()
	in, err := e.d.Get(testCtx(t), name)
	if err != nil || in.Usage == nil {
		t.Fatalf("Get(%s) = %+v, %v (no usage)", name, in, err)
	}
	return *in.Usage
}

func (e *env) generations(t *testing.T, project string) map[int][]string {
	t.Helper()
	gs, err := e.d.Goldens(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	out := map[int][]string{}
	for _, g := range gs {
		if g.Project != project {
			continue
		}
		for _, gen := range g.Generations {
			deps := slices.Clone(gen.Dependents)
			slices.Sort(deps)
			out[gen.Number] = append([]string{}, deps...)
		}
	}
	return out
}

func (e *env) storeEntries(t *testing.T, sub string) []string {
	t.Helper()
	harness.ReflinkUnlinked(t, filepath.Join(e.root, "store"))
	entries, err := os.ReadDir(filepath.Join(e.root, "store", sub))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	var names []string
	for _, en := range entries {
		names = append(names, en.Name())
	}
	return names
}

// lifecycle is the whole story on one root: import, clone, isolation, promotion of a mounted
// volume, older generations, dependents, reclaim, golden rm, removal, and no leaks.
func lifecycle(t *testing.T, e *env, wantMode string) {
	st, err := e.d.Status(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if st.ReflinkStatus == nil || st.StoreMode != wantMode {
		t.Fatalf("status %+v, want store_mode %s", st, wantMode)
	}
	if st.AvailableBytes == 0 {
		t.Fatalf("status has no free space: %v", st)
	}

	g1 := e.importTree(t, "prj")
	if g1.Number != 1 || g1.Referenced == 0 || !strings.HasPrefix(g1.FromVolume, "import:") {
		t.Fatalf("import made %+v", g1)
	}
	e.create(t, "a", map[string]string{"golden": "prj"})
	e.create(t, "b", map[string]string{"golden": "prj"})

	// A fresh reflink shares every extent with its generation: nothing is its own yet.
	if u := e.usage(t, "a"); u.Written != 0 || u.Referenced == 0 || u.Size != 1<<30 || u.Device != "" {
		t.Fatalf("usage of a fresh clone = %+v; want Written 0, Referenced > 0, Size 1G, no device", u)
	}

	// Both clones carry the golden's XFS UUID: mounted at once, they need nouuid.
	ma, mb := e.mount(t, "a", "ca"), e.mount(t, "b", "cb")
	drivertest.CheckTree(t, ma)
	drivertest.CheckTree(t, mb)
	if u := e.usage(t, "a"); !strings.HasPrefix(u.Device, "/dev/loop") {
		t.Fatalf("usage of a mounted volume names no loop device: %+v", u)
	}
	big := strings.Repeat("a", 4<<20)
	writeFile(t, filepath.Join(ma, "only-a"), big)
	writeFile(t, filepath.Join(mb, "README"), "changed in b")
	if _, err := os.Stat(filepath.Join(mb, "only-a")); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("a write in volume a is visible in volume b")
	}
	if got := readFile(t, filepath.Join(ma, "README")); got != "golden content\n" {
		t.Fatalf("a write in volume b changed volume a: %q", got)
	}

	flush(t, e, "a", ma)
	if u := e.usage(t, "a"); u.Written < 4<<20 {
		t.Fatalf("usage of a after writing 4 MiB = %+v; want Written >= 4 MiB", u)
	}

	// Promote a while it is mounted (frozen for the reflink); it stays writable afterwards.
	g2, err := e.d.Promote(testCtx(t), "a", "prj")
	if err != nil {
		t.Fatalf("Promote mounted a: %v", err)
	}
	if g2.Number != 2 || g2.FromVolume != "a" {
		t.Fatalf("promotion made %+v, want generation 2 from a", g2)
	}
	writeFile(t, filepath.Join(ma, "after-promote"), "x")
	// What a wrote is now shared with generation 2: no longer a's alone.
	flush(t, e, "a", ma)
	if u := e.usage(t, "a"); u.Written >= 4<<20 {
		t.Fatalf("usage of a after its promotion = %+v; want what it wrote before counted as shared", u)
	}

	e.create(t, "c", map[string]string{"golden": "prj"})                    // newest: generation 2
	e.create(t, "d", map[string]string{"golden": "prj", "generation": "1"}) // the older one
	mc, md := e.mount(t, "c", "cc"), e.mount(t, "d", "cd")
	drivertest.CheckTree(t, mc)
	drivertest.CheckTree(t, md)
	if got := readFile(t, filepath.Join(mc, "only-a")); got != big {
		t.Fatal("the clone of generation 2 lacks what a wrote before its promotion")
	}
	if _, err := os.Stat(filepath.Join(mc, "after-promote")); err == nil {
		t.Fatal("a write made after the promotion leaked into generation 2")
	}
	if _, err := os.Stat(filepath.Join(md, "only-a")); err == nil {
		t.Fatal("generation 1 changed after a promotion")
	}

	want := map[int][]string{1: {"a", "b", "d"}, 2: {"c"}}
	if got := e.generations(t, "prj"); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("generations and dependents = %v, want %v", got, want)
	}
	if err := e.d.RemoveGolden(testCtx(t), "prj", false); !errors.Is(err, driver.ErrHasDependents) {
		t.Fatalf("RemoveGolden with dependents: err = %v, want ErrHasDependents", err)
	}
	if err := e.store.RemoveGeneration(testCtx(t), "prj", 1); !errors.Is(err, driver.ErrGenerationInUse) {
		t.Fatalf("RemoveGeneration of a generation in use: err = %v, want ErrGenerationInUse", err)
	}
	if removed, err := e.d.Reclaim(testCtx(t), "prj", 1); err != nil || len(removed) != 0 {
		t.Fatalf("Reclaim with every generation in use removed %+v, %v", removed, err)
	}

	for _, v := range []struct{ name, id string }{{"a", "ca"}, {"b", "cb"}, {"c", "cc"}, {"d", "cd"}} {
		e.unmount(t, v.name, v.id)
	}
	if err := e.d.Remove(testCtx(t), "b"); err != nil {
		t.Fatal(err)
	}
	e.remove(t, "a")
	e.remove(t, "d")
	removed, err := e.d.Reclaim(testCtx(t), "prj", 1)
	if err != nil || len(removed) != 1 || removed[0].Number != 1 {
		t.Fatalf("Reclaim = %+v, %v; want generation 1 only", removed, err)
	}
	// c outlives the reclaim of nothing it needs, and reads its generation intact.
	mc = e.mount(t, "c", "cc")
	drivertest.CheckTree(t, mc)
	e.unmount(t, "c", "cc")
	e.remove(t, "c")
	if err := e.d.RemoveGolden(testCtx(t), "prj", false); err != nil {
		t.Fatalf("RemoveGolden: %v", err)
	}
	if v, g := e.storeEntries(t, "volumes"), e.storeEntries(t, "goldens"); len(v)+len(g) > 0 {
		t.Fatalf("left in the store: volumes %v, goldens %v", v, g)
	}
	e.finish(t)
}

// TestLifecycleStoreFile runs on the host's disk (ext4), which cannot reflink, so the store keeps
// a sparse XFS store file.
func TestLifecycleStoreFile(t *testing.T) {
	base := newBase(t)
	e := newEnv(t, base, filepath.Join(base, "zg"), nil)
	if fi, err := os.Stat(filepath.Join(e.root, "store.img")); err != nil || fi.Size() != 8<<30 {
		t.Fatalf("store file: %v, %v", fi, err)
	}
	lifecycle(t, e, "file")
}

// TestLifecycleNativeXFS runs on an XFS formatted with reflink=1: images live on it directly.
func TestLifecycleNativeXFS(t *testing.T) {
	base := newBase(t)
	e := newEnv(t, base, filepath.Join(nativeFS(t, base, "xfs"), "zg"), nil)
	if _, err := os.Stat(filepath.Join(e.root, "store.img")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a native root got a store file: %v", err)
	}
	lifecycle(t, e, "native")
}

// TestLifecycleNativeBtrfs runs on btrfs, the other filesystem with reflinks.
func TestLifecycleNativeBtrfs(t *testing.T) {
	base := newBase(t)
	e := newEnv(t, base, filepath.Join(nativeFS(t, base, "btrfs"), "zg"), nil)
	lifecycle(t, e, "native")
}

// TestModeDetection checks that the store decides by trying a reflink, not by filesystem type:
// an XFS without reflink=1 needs a store file too.
func TestModeDetection(t *testing.T) {
	base := newBase(t)
	e := newEnv(t, base, filepath.Join(nativeFS(t, base, "xfs-noreflink"), "zg"), func(c *reflinkstore.Config) { c.StoreSize = 1 << 30 })
	st, err := e.d.Status(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if st.ReflinkStatus == nil || st.StoreMode != "file" || st.Filesystem != "xfs" {
		t.Fatalf("on XFS with reflink=0: status %v, want store_mode=file on an xfs store file", st)
	}
	e.create(t, "v", nil)
	e.mount(t, "v", "c")
	e.unmount(t, "v", "c")
	e.remove(t, "v")
	e.finish(t)
}

// TestRestart builds the store and driver again on the same root, first as after kill -9 (mounts
// stay), then as after a reboot (nothing is mounted, the store file included).
func TestRestart(t *testing.T) {
	base := newBase(t)
	e := newEnv(t, base, filepath.Join(base, "zg"), nil)
	e.importTree(t, "prj")
	e.create(t, "kept", map[string]string{"golden": "prj"})
	e.create(t, "other", map[string]string{"golden": "prj"})
	e.create(t, "idle", nil)
	mp := e.mount(t, "kept", "c1")
	e.mount(t, "kept", "c2")
	writeFile(t, filepath.Join(mp, "before-restart"), "x")

	e.open(t) // kill -9 and restart: the store file and the volume stay mounted
	var names []string
	for _, v := range e.d.List() {
		names = append(names, v.Name)
	}
	if !slices.Equal(names, []string{"idle", "kept", "other"}) {
		t.Fatalf("after restart List = %v", names)
	}
	if in, _ := e.d.Get(testCtx(t), "kept"); in.Mounts != 2 || in.Generation != 1 || in.Golden != "prj" {
		t.Fatalf("after restart Get(kept) = %+v", in)
	}
	e.unmount(t, "kept", "c1")
	if m, _ := xfsutil.MountedAt(mp); m == nil {
		t.Fatal("unmounting one of two callers after a restart unmounted the volume")
	}
	e.unmount(t, "kept", "c2") // the old ID from before the restart
	if m, _ := xfsutil.MountedAt(mp); m != nil {
		t.Fatal("the last unmount after a restart left the volume mounted")
	}
	if kept := keptMounts(t, e); len(kept) != 1 {
		t.Fatalf("after the last unmount the kept mounts are %v, want the volume's one", kept)
	}
	assertNoImageLoops(t, e) // the kept mount's alone

	// A reboot: the kernel forgets every mount and loop device, the mount references stay.
	e.mount(t, "kept", "c3")
	if err := xfsutil.Unmount(testCtx(t), mp); err != nil {
		t.Fatal(err)
	}
	if err := e.store.Close(testCtx(t)); err != nil {
		t.Fatalf("Close: %v", err)
	}
	assertNoLeaks(t, e.root)
	e.open(t) // remounts the store file
	if in, _ := e.d.Get(testCtx(t), "kept"); in.Mounts != 0 {
		t.Fatalf("after a reboot kept still has %d mount references", in.Mounts)
	}
	// Two clones of one generation at once after the reboot: nouuid on every mount.
	mk, mo := e.mount(t, "kept", "c4"), e.mount(t, "other", "c5")
	if got := readFile(t, filepath.Join(mk, "before-restart")); got != "x" {
		t.Fatalf("data lost across the reboot: %q", got)
	}
	drivertest.CheckTree(t, mo)
	if err := e.store.Close(testCtx(t)); !errors.Is(err, driver.ErrBusy) {
		t.Fatalf("Close with mounted volumes: err = %v, want ErrBusy", err)
	}
	e.unmount(t, "kept", "c4")
	e.unmount(t, "other", "c5")
	for _, n := range []string{"kept", "other", "idle"} {
		e.remove(t, n)
	}
	e.finish(t)
}

// TestRemoveUnlinksAfterReturning: Remove renames the image away and unlinks it after it has
// returned (the unlink's time grows with what the volume wrote), so the name is free at once,
// Status counts the image until its space is back, and Close waits for it.
func TestRemoveUnlinksAfterReturning(t *testing.T) {
	base := newBase(t)
	e := newEnv(t, base, filepath.Join(base, "zg"), nil)
	ctx := testCtx(t)
	e.importTree(t, "prj")
	vols := filepath.Join(e.root, "store", "volumes")
	for i := 0; i < 4; i++ {
		e.create(t, "w", map[string]string{"golden": "prj"})
		mp := e.mount(t, "w", "c1")
		harness.Run(t, "dd", "if=/dev/urandom", "of="+filepath.Join(mp, "data"), "bs=1M", "count=64", "conv=fsync", "status=none")
		e.unmount(t, "w", "c1")
		e.remove(t, "w")
		if _, err := os.Stat(filepath.Join(vols, "w.img")); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("after Remove, w.img: %v; want it gone", err)
		}
	}
	// The same name was made again at once each time; what is left of the four is unlinked.
	// The name goes first, inside unlink(2), and the extents after it: Status counts an unlink
	// until its call has returned, so it is what the test waits on.
	var st driver.Status
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		var err error
		if st, err = e.store.Status(ctx); err != nil {
			t.Fatal(err)
		}
		if st.RemovedPending == 0 || time.Now().After(deadline) {
			break
		}
	}
	if st.RemovedPending != 0 {
		t.Fatalf("Status 30 s after the Removes: %v; want removed_pending 0", st)
	}
	if left, _ := filepath.Glob(filepath.Join(vols, ".tmp-*")); len(left) > 0 {
		t.Fatalf("removed images never unlinked: %v", left)
	}

	// Close waits for an unlink still running: nothing is left when it returns.
	e.create(t, "last", map[string]string{"golden": "prj"})
	mp := e.mount(t, "last", "c1")
	harness.Run(t, "dd", "if=/dev/urandom", "of="+filepath.Join(mp, "data"), "bs=1M", "count=64", "conv=fsync", "status=none")
	e.unmount(t, "last", "c1")
	e.remove(t, "last")
	e.finish(t)
}

// TestLoadRepairsCrashLeftovers plants what crashes leave behind and checks that a restart
// cleans all of it, lists no half-made volume, and touches nothing it did not make.
func TestLoadRepairsCrashLeftovers(t *testing.T) {
	base := newBase(t)
	e := newEnv(t, base, filepath.Join(base, "zg"), nil)
	ctx := testCtx(t)
	e.importTree(t, "prj")
	e.create(t, "v", map[string]string{"golden": "prj"})
	vols := filepath.Join(e.root, "store", "volumes")
	proj := filepath.Join(e.root, "store", "goldens", "prj")

	// 1. A Create that died after its reflink, before its rename.
	cp := exec.Command("cp", "--reflink=always", filepath.Join(proj, "gen1.img"), filepath.Join(vols, ".tmp-w-123.img"))
	if out, err := cp.CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	setxattr(t, filepath.Join(vols, ".tmp-w-123.img"), "state", "ready")
	// 2. An import that died while copying: its image is still mounted in the work directory.
	importing := filepath.Join(proj, ".tmp-gen2-abc.img")
	makeXFS(t, importing)
	setxattr(t, importing, "state", "importing")
	if err := xfsutil.Mount(ctx, importing, filepath.Join(e.root, "work", "import-prj-2"), []string{"loop", "nouuid"}); err != nil {
		t.Fatal(err)
	}
	// 3. A promotion that died after its completion marker, before its rename: rolled forward.
	cp = exec.Command("cp", "--reflink=always", filepath.Join(proj, "gen1.img"), filepath.Join(proj, ".tmp-gen3-def.img"))
	if out, err := cp.CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	for k, v := range map[string]string{"kind": "block", "state": "ready", "from": "v", "created": "1700000000"} {
		setxattr(t, filepath.Join(proj, ".tmp-gen3-def.img"), k, v)
	}
	// 4. A loop device attached to a volume and mounted nowhere (a crash inside mount).
	out, err := exec.Command("losetup", "--find", "--show", filepath.Join(vols, "v.img")).Output()
	if err != nil {
		t.Fatal(err)
	}
	leaked := strings.TrimSpace(string(out))
	// 4b. The same, attached by an earlier managed-plugin instance: its mount namespace is gone,
	// so the device names its file by a path that is not under the store. A bind mount detached
	// after the attach leaves the same.
	elsewhere := filepath.Join(base, "elsewhere")
	if err := os.Mkdir(elsewhere, 0o755); err != nil {
		t.Fatal(err)
	}
	harness.Run(t, "mount", "--bind", filepath.Join(e.root, "store"), elsewhere)
	out, err = exec.Command("losetup", "--find", "--show", filepath.Join(elsewhere, "goldens", "prj", "gen1.img")).Output()
	if err != nil {
		t.Fatal(err)
	}
	foreignNS := strings.TrimSpace(string(out))
	harness.Run(t, "umount", "-l", elsewhere) // the test's stand-in for the dead namespace
	if l, _ := xfsutil.LoopOf(foreignNS); l.BackingFile == "" || strings.HasPrefix(l.BackingFile, e.root) {
		t.Fatalf("%s reads as backed by %q; the test needs a path outside the store", foreignNS, l.BackingFile)
	}
	// 5. A file zgolden did not make: listed nowhere, deleted never.
	writeFile(t, filepath.Join(vols, "foreign.img"), "not ours")
	// 6. A Remove that died after its rename, before the unlink that follows it.
	cp = exec.Command("cp", "--reflink=always", filepath.Join(proj, "gen1.img"), filepath.Join(vols, ".tmp-removed.gone-1a2b.img"))
	if out, err := cp.CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}

	e.open(t)

	var names []string
	for _, v := range e.d.List() {
		names = append(names, v.Name)
	}
	if !slices.Equal(names, []string{"v"}) {
		t.Fatalf("after Load, List = %v; want only v", names)
	}
	if got := e.storeEntries(t, "volumes"); !slices.Equal(got, []string{"foreign.img", "v.img"}) {
		t.Fatalf("volume directory after Load = %v", got)
	}
	if got := e.storeEntries(t, "goldens/prj"); !slices.Equal(got, []string{"gen1.img", "gen3.img"}) {
		t.Fatalf("golden directory after Load = %v; want gen1 and the rolled-forward gen3", got)
	}
	if l, _ := xfsutil.LoopOf(leaked); l.BackingFile != "" {
		t.Fatalf("the leaked loop device %s is still attached to %s", leaked, l.BackingFile)
	}
	if l, _ := xfsutil.LoopOf(foreignNS); l.BackingFile != "" {
		t.Fatalf("the loop device %s, attached from another mount namespace, is still attached to %s", foreignNS, l.BackingFile)
	}
	if m, _ := xfsutil.MountsUnder(filepath.Join(e.root, "work")); len(m) > 0 {
		t.Fatalf("the interrupted import is still mounted: %+v", m)
	}
	// Generation numbers only grow: the wiped import's number 2 is never reused.
	e.create(t, "p", map[string]string{"golden": "prj"})
	if g, err := e.d.Promote(ctx, "p", "prj"); err != nil || g.Number != 4 {
		t.Fatalf("Promote after recovery = %+v, %v; want generation 4", g, err)
	}
	mp := e.mount(t, "v", "c")
	drivertest.CheckTree(t, mp)
	e.unmount(t, "v", "c")
	for _, n := range []string{"v", "p"} {
		e.remove(t, n)
	}
	if err := os.Remove(filepath.Join(vols, "foreign.img")); err != nil {
		t.Fatal(err)
	}
	e.finish(t)
}

// flush writes a mounted volume's data back into its image, as the kernel does within about 30 s:
// Usage reads the image as of its last writeback (XFS remaps copied-on-write extents then).
func flush(t *testing.T, e *env, name, mountpoint string) {
	t.Helper()
	if err := xfsutil.Sync(mountpoint); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(filepath.Join(e.root, "store", "volumes", name+".img"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

func setxattr(t *testing.T, path, key, value string) {
	t.Helper()
	if err := unix.Setxattr(path, "user.zgolden."+key, []byte(value), 0); err != nil {
		t.Fatal(err)
	}
}

func makeXFS(t *testing.T, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(1 << 30); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := xfsutil.Mkfs(testCtx(t), path, ""); err != nil {
		t.Fatal(err)
	}
}

// TestNoSpace fills a tiny store and checks the failures are ErrNoSpace and leave nothing behind.
func TestNoSpace(t *testing.T) {
	base := newBase(t)
	e := newEnv(t, base, filepath.Join(base, "zg"), func(c *reflinkstore.Config) { c.StoreSize = 512 << 20 })
	ctx := testCtx(t)

	// A 1T XFS needs a 512 MiB log: more than the whole store.
	err := e.d.Create(ctx, "huge", map[string]string{"size": "1T"})
	if !errors.Is(err, driver.ErrNoSpace) {
		t.Fatalf("Create of a volume whose XFS does not fit: err = %v, want ErrNoSpace", err)
	}
	t.Logf("the error a user sees: %v", err)
	if got := e.storeEntries(t, "volumes"); len(got) > 0 {
		t.Fatalf("a failed create left %v", got)
	}
	if len(e.d.List()) != 0 {
		t.Fatalf("a failed create registered %+v", e.d.List())
	}

	// An import of more data than the store holds: random bytes, so nothing is sparse.
	src := t.TempDir()
	data := make([]byte, 600<<20)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(src, "big"), string(data))
	_, err = e.d.Import(ctx, "full", driver.KindBlock, src, driver.ImportOptions{}, nil)
	if !errors.Is(err, driver.ErrNoSpace) {
		t.Fatalf("Import larger than the store: err = %v, want ErrNoSpace", err)
	}
	t.Logf("the error a user sees: %v", err)
	if got := e.storeEntries(t, "goldens"); len(got) > 0 {
		t.Fatalf("a failed import left %v", got)
	}
	assertNoImageLoops(t, e)
	assertNoLeaks(t, filepath.Join(e.root, "work"))

	// The space came back: an ordinary volume still fits.
	e.create(t, "ok", nil)
	mp := e.mount(t, "ok", "c")
	writeFile(t, filepath.Join(mp, "f"), "fine")
	e.unmount(t, "ok", "c")
	e.remove(t, "ok")
	e.finish(t)
}

// TestInvalidNamesTouchNothing sends names that try to leave the store, through the driver and
// straight to the backend, and plants symlinks that point outside: nothing outside is touched
// and nothing is created.
func TestInvalidNamesTouchNothing(t *testing.T) {
	base := newBase(t)
	e := newEnv(t, base, filepath.Join(base, "zg"), nil)
	ctx := testCtx(t)
	e.importTree(t, "prj")
	outside := filepath.Join(base, "outside")
	if err := os.MkdirAll(outside, 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(outside, "gen1.img"), "precious")
	writeFile(t, filepath.Join(outside, "x.img"), "precious")
	before := inventory(t, e.root)

	for _, name := range []string{"../x", "a/b", "", ".hidden", "..", "a b", "x\x00y", strings.Repeat("n", 200)} {
		if err := e.d.Create(ctx, name, nil); !errors.Is(err, driver.ErrInvalid) {
			t.Errorf("driver Create(%q): err = %v, want ErrInvalid", name, err)
		}
		if _, err := e.store.Create(ctx, driver.Spec{Name: name, Kind: driver.KindBlock}); !errors.Is(err, driver.ErrInvalid) {
			t.Errorf("backend Create(%q): err = %v, want ErrInvalid", name, err)
		}
		if err := e.store.Remove(ctx, driver.Volume{Name: name}); !errors.Is(err, driver.ErrInvalid) {
			t.Errorf("backend Remove(%q): err = %v, want ErrInvalid", name, err)
		}
		if err := e.store.Mount(ctx, driver.Volume{Name: name}, filepath.Join(base, "m")); !errors.Is(err, driver.ErrInvalid) {
			t.Errorf("backend Mount(%q): err = %v, want ErrInvalid", name, err)
		}
		if _, err := e.store.BeginGeneration(ctx, name, driver.KindBlock, 0, "test"); !errors.Is(err, driver.ErrInvalid) {
			t.Errorf("backend BeginGeneration(%q): err = %v, want ErrInvalid", name, err)
		}
		if err := e.store.RemoveGolden(ctx, name); !errors.Is(err, driver.ErrInvalid) {
			t.Errorf("backend RemoveGolden(%q): err = %v, want ErrInvalid", name, err)
		}
		if err := e.store.RemoveGeneration(ctx, name, 1); !errors.Is(err, driver.ErrInvalid) {
			t.Errorf("backend RemoveGeneration(%q): err = %v, want ErrInvalid", name, err)
		}
		if _, err := e.store.Promote(ctx, driver.Volume{Name: "v", Kind: driver.KindBlock}, "", name); !errors.Is(err, driver.ErrInvalid) {
			t.Errorf("backend Promote to %q: err = %v, want ErrInvalid", name, err)
		}
		if name == "" {
			continue // no golden: a plain volume
		}
		if _, err := e.store.Create(ctx, driver.Spec{Name: "ok", Golden: name, Kind: driver.KindBlock}); !errors.Is(err, driver.ErrInvalid) {
			t.Errorf("backend Create with golden %q: err = %v, want ErrInvalid", name, err)
		}
	}
	if got := inventory(t, e.root); !slices.Equal(got, before) {
		t.Fatalf("invalid requests changed the store:\n got %q\nwant %q", got, before)
	}
	// type=fs is an image here too, recorded as fs (see Store.Create).
	if v, err := e.store.Create(ctx, driver.Spec{Name: "fs", Kind: driver.KindFS}); err != nil || v.Kind != driver.KindFS {
		t.Errorf("type=fs: %+v, %v; want a volume of kind fs", v, err)
	} else if err := e.store.Remove(ctx, v); err != nil {
		t.Fatal(err)
	}

	// Planted symlinks: a project that is a symlink to a directory outside, and a volume image
	// that is a symlink to a file outside.
	goldens := filepath.Join(e.root, "store", "goldens")
	if err := os.Symlink(outside, filepath.Join(goldens, "evil")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(outside, "x.img"), filepath.Join(e.root, "store", "volumes", "x.img")); err != nil {
		t.Fatal(err)
	}
	if err := e.store.RemoveGolden(ctx, "evil"); err == nil {
		t.Error("RemoveGolden of a symlinked project succeeded")
	}
	if err := e.store.RemoveGeneration(ctx, "evil", 1); err == nil {
		t.Error("RemoveGeneration in a symlinked project succeeded")
	}
	if err := e.store.Remove(ctx, driver.Volume{Name: "x"}); err != nil {
		t.Errorf("Remove of a symlinked image: %v", err)
	}
	for _, f := range []string{"gen1.img", "x.img"} {
		if got := readFile(t, filepath.Join(outside, f)); got != "precious" {
			t.Fatalf("%s outside the store was changed: %q", f, got)
		}
	}
	if err := os.Remove(filepath.Join(goldens, "evil")); err != nil {
		t.Fatal(err)
	}
	if err := e.d.RemoveGolden(ctx, "prj", false); err != nil {
		t.Fatal(err)
	}
	e.finish(t)
}

// inventory lists every file and directory under root, and every loop device backed by one.
func inventory(t *testing.T, root string) []string {
	t.Helper()
	harness.ReflinkUnlinked(t, filepath.Join(root, "store"))
	return harness.ReflinkInventory(t, root)
}

// TestSizes covers -o size: a fresh volume gets exactly it, a clone grows to it (image at create,
// XFS at first mount, also through a promotion of a never-mounted grown volume), and a clone
// smaller than its golden is refused.
func TestSizes(t *testing.T) {
	base := newBase(t)
	e := newEnv(t, base, filepath.Join(base, "zg"), nil)
	ctx := testCtx(t)
	e.importTree(t, "prj") // a 1 GiB image: the default size

	e.create(t, "plain", map[string]string{"size": "700M"})
	if u := e.usage(t, "plain"); u.Size != 700<<20 {
		t.Fatalf("plain volume size = %d, want 700M", u.Size)
	}
	e.create(t, "cold", map[string]string{"golden": "none_yet"})
	if in, _ := e.d.Get(ctx, "cold"); !in.ColdStart || in.Size != 1<<30 {
		t.Fatalf("cold start = %+v, want a 1G cold start", in.Volume)
	}
	if err := e.d.Create(ctx, "small", map[string]string{"golden": "prj", "size": "600M"}); !errors.Is(err, driver.ErrInvalid) {
		t.Fatalf("a clone smaller than its golden: err = %v, want ErrInvalid", err)
	}
	if got := e.storeEntries(t, "volumes"); len(got) != 2 {
		t.Fatalf("the refused clone left files: %v", got)
	}

	e.create(t, "grown", map[string]string{"golden": "prj", "size": "3G"})
	if u := e.usage(t, "grown"); u.Size != 3<<30 {
		t.Fatalf("grown image size = %d, want 3G", u.Size)
	}
	// Promoted before its first mount: its XFS is still 1G, and the generation says so.
	if g, err := e.d.Promote(ctx, "grown", "prj"); err != nil || g.Number != 2 {
		t.Fatalf("Promote grown: %+v, %v", g, err)
	}
	e.create(t, "child", map[string]string{"golden": "prj"})
	for _, name := range []string{"grown", "child"} {
		mp := e.mount(t, name, "c")
		_, total, err := xfsutil.FreeSpace(mp)
		if err != nil {
			t.Fatal(err)
		}
		if total < 2900<<20 {
			t.Fatalf("%s: XFS is %d bytes after its first mount; want it grown to about 3G", name, total)
		}
		drivertest.CheckTree(t, mp)
		e.unmount(t, name, "c")
		buf := make([]byte, 16)
		if _, err := unix.Getxattr(filepath.Join(e.root, "store", "volumes", name+".img"), "user.zgolden.grow", buf); !errors.Is(err, unix.ENODATA) {
			t.Fatalf("%s: grow marker still set after the grow: %v", name, err)
		}
	}
	for _, n := range []string{"plain", "cold", "grown", "child"} {
		e.remove(t, n)
	}
	e.finish(t)
}

// TestRootOwnership checks the store refuses a root with files it did not make, unless adopting.
func TestRootOwnership(t *testing.T) {
	base := newBase(t)
	root := filepath.Join(base, "zg")
	if err := os.MkdirAll(root, 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(root, "someone-elses"), "x")
	_, err := reflinkstore.New(testCtx(t), reflinkstore.Config{Root: root, StoreSize: 1 << 30, DefaultSize: 1 << 30, Log: testLog(t)})
	if err == nil || !strings.Contains(err.Error(), "--adopt") {
		t.Fatalf("New on a root with foreign files: err = %v, want a refusal that mentions --adopt", err)
	}
	if got := inventory(t, root); !slices.Equal(got, []string{".", "someone-elses"}) {
		t.Fatalf("a refused New created %v", got)
	}
	for _, bad := range []string{"relative/path", "/"} {
		if _, err := reflinkstore.New(testCtx(t), reflinkstore.Config{Root: bad}); err == nil {
			t.Fatalf("New with root %q succeeded", bad)
		}
	}
	e := newEnv(t, base, root, func(c *reflinkstore.Config) { c.Adopt = true; c.StoreSize = 1 << 30 })
	e.cfg.Adopt = false
	e.open(t) // the marker makes it ours now
	e.finish(t)
}

// TestRootHoldsZgoldensOwnDirs: with the defaults, the driver's mount root (ROOT/mounts) lies in
// the reflink store's root. Whichever ran first, a store given that directory as Reserved opens
// the root (and opens it again); without it a root holding the mount root is refused at the
// store's first start, and a reserved name that is a file, not a directory, is still foreign.
func TestRootHoldsZgoldensOwnDirs(t *testing.T) {
	base := newBase(t)
	for _, order := range []string{"mount-root-first", "store-first"} {
		t.Run(order, func(t *testing.T) {
			root := filepath.Join(base, order)
			mounts := filepath.Join(root, "mounts")
			cfg := func() reflinkstore.Config {
				return reflinkstore.Config{Root: root, StoreSize: 1 << 30, DefaultSize: 1 << 30, Log: testLog(t), Reserved: []string{mounts, "/run/zgolden"}}
			}
			if order == "mount-root-first" { // an earlier serve on ZFS made only its mount root
				if err := os.MkdirAll(filepath.Join(mounts, "v"), 0o755); err != nil {
					t.Fatal(err)
				}
				// Before the store's first start (its marker then makes the root its own).
				bare := cfg()
				bare.Reserved = nil
				if _, err := reflinkstore.New(testCtx(t), bare); err == nil || !strings.Contains(err.Error(), "mounts") {
					t.Fatalf("New without Reserved: err = %v, want the mounts directory refused", err)
				}
			}
			s, err := reflinkstore.New(testCtx(t), cfg())
			if err != nil {
				t.Fatalf("New: %v", err)
			}
			if err := s.Close(testCtx(t)); err != nil {
				t.Fatal(err)
			}
			if err := os.MkdirAll(filepath.Join(mounts, "v"), 0o755); err != nil {
				t.Fatal(err)
			}
			s, err = reflinkstore.New(testCtx(t), cfg())
			if err != nil {
				t.Fatalf("New again, with the mount root in place: %v", err)
			}
			if err := s.Close(testCtx(t)); err != nil {
				t.Fatal(err)
			}
		})
	}
	root := filepath.Join(base, "file")
	if err := os.MkdirAll(root, 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(root, "mounts"), "x")
	_, err := reflinkstore.New(testCtx(t), reflinkstore.Config{Root: root, StoreSize: 1 << 30, Log: testLog(t), Reserved: []string{filepath.Join(root, "mounts")}})
	if err == nil || !strings.Contains(err.Error(), "mounts") {
		t.Fatalf("a file named like a reserved directory: err = %v, want it refused", err)
	}
}

// TestConcurrentCloneAndReclaim races Creates of an old generation against its removal: a
// generation is either removed before a Create picks it (which then fails with ErrNotFound) or
// kept because the Create made it a dependent, never removed under a volume that names it.
func TestConcurrentCloneAndReclaim(t *testing.T) {
	base := newBase(t)
	e := newEnv(t, base, filepath.Join(base, "zg"), nil)
	ctx := testCtx(t)
	e.importTree(t, "prj")
	e.create(t, "p", map[string]string{"golden": "prj"})
	if _, err := e.d.Promote(ctx, "p", "prj"); err != nil { // generation 2, so 1 is reclaimable
		t.Fatal(err)
	}
	e.remove(t, "p")
	const n = 6
	var wg sync.WaitGroup
	created := make(chan string, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			name := fmt.Sprintf("c%d", i)
			time.Sleep(time.Duration(i) * time.Millisecond) // spread over the reclaim
			err := e.d.Create(ctx, name, map[string]string{"golden": "prj", "generation": "1"})
			switch {
			case err == nil:
				created <- name
			case !errors.Is(err, driver.ErrNotFound):
				t.Errorf("Create(%s): %v", name, err)
			}
		}(i)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		// A Create that commits between Reclaim's listing and its removal makes the backend
		// refuse (ErrGenerationInUse); the driver's Reclaim passes that on instead of skipping
		// the generation.
		if _, err := e.d.Reclaim(ctx, "prj", 1); err != nil && !errors.Is(err, driver.ErrGenerationInUse) {
			t.Errorf("Reclaim: %v", err)
		}
	}()
	wg.Wait()
	close(created)
	var names []string
	for name := range created {
		names = append(names, name)
	}
	gens := e.generations(t, "prj")
	if deps, kept := gens[1]; len(names) > 0 && !kept {
		t.Fatalf("generation 1 was removed although %v were cloned from it", names)
	} else if kept && len(deps) != len(names) {
		t.Fatalf("generation 1 has dependents %v, want %v", deps, names)
	}
	t.Logf("%d creates won the race, generation 1 kept: %v", len(names), gens[1] != nil)
	for _, name := range names {
		mp := e.mount(t, name, "c")
		drivertest.CheckTree(t, mp)
		e.unmount(t, name, "c")
		e.remove(t, name)
	}
	e.finish(t)
}

// TestSecondProcessRefused starts a second process on a root this one holds: it must refuse to
// open it, instead of deleting the first one's half-made images as crash leftovers. Once the first
// store is closed, the second process may open it.
func TestSecondProcessRefused(t *testing.T) {
	base := newBase(t)
	e := newEnv(t, base, filepath.Join(base, "zg"), nil)
	second := func() (string, int) {
		cmd := exec.Command(os.Args[0])
		cmd.Env = append(os.Environ(), openRootEnv+"="+e.root)
		out, err := cmd.CombinedOutput()
		var exitErr *exec.ExitError
		if errors.As(err, &exitErr) {
			return string(out), exitErr.ExitCode()
		}
		if err != nil {
			t.Fatal(err)
		}
		return string(out), 0
	}
	out, code := second()
	if code != 3 || !strings.Contains(out, fmt.Sprintf("pid %d", os.Getpid())) {
		t.Fatalf("a second process on a held root: exit %d, %q; want a refusal naming this process", code, out)
	}
	t.Logf("the error the second process sees: %s", strings.TrimSpace(out))
	e.finish(t) // Close releases the lock
	if out, code := second(); code != 0 {
		t.Fatalf("after Close, a second process could not open the root: exit %d, %q", code, out)
	}
	// The second process mounted the store file and exited without closing: release it.
	forceClean(t, base)
}
