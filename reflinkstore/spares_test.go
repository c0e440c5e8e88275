package reflinkstore_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/zgolden/zgolden/reflinkstore"
)

// inodes maps the inode of each image in dir to its name.
func inodes(t *testing.T, dir string) map[uint64]string {
	t.Helper()
	out := map[uint64]string{}
	entries, err := os.ReadDir(dir)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	for _, e := range entries {
		var st unix.Stat_t
		if strings.HasSuffix(e.Name(), ".img") && !strings.HasPrefix(e.Name(), ".tmp-") && unix.Stat(filepath.Join(dir, e.Name()), &st) == nil {
			out[st.Ino] = e.Name()
		}
	}
	return out
}

// inode is the inode number of path.
func inode(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// waitSpares waits until project has n ready spares, each mounted, and returns their images by
// inode.
func waitSpares(t *testing.T, e *env, project string, n int) map[uint64]string {
	t.Helper()
	dir := filepath.Join(e.root, "store", "spares")
	var last string
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		st, err := e.store.Status(testCtx(t))
		total := 0
		for _, k := range st.SparesReady {
			total += k
		}
		if err == nil && st.SparesReady[project] == n && st.SparesMounted == total {
			got := map[uint64]string{}
			for ino, name := range inodes(t, dir) {
				if strings.HasPrefix(name, project+"-") {
					got[ino] = name
				}
			}
			if len(got) == n && len(keptMounts(t, e)) >= total {
				return got
			}
		}
		last = fmt.Sprintf("ready %v, mounted %d (%v)", st.SparesReady, st.SparesMounted, err)
	}
	t.Fatalf("%s never had %d spares ready and mounted: %s", project, n, last)
	return nil
}

// TestSparesAreClaimed: with --spares, a Create of a project's newest generation takes a spare's
// image (the same inode) and its Mount binds the spare's XFS, mounted ahead; the worker restocks,
// replaces the spares after a promotion, adopts them after a restart, and retires them with
// their golden. A golden removed and imported again under the same name never hands out a spare
// of the old one.
func TestSparesAreClaimed(t *testing.T) {
	base := newBase(t)
	e := newEnv(t, base, filepath.Join(base, "zg"), func(c *reflinkstore.Config) { c.Spares = 2 })
	e.importTree(t, "prj")
	spares := waitSpares(t, e, "prj", 2)
	vols := filepath.Join(e.root, "store", "volumes")

	e.create(t, "v", map[string]string{"golden": "prj"})
	waitNoRecords(t, e) // the claim's record goes once its rename is synced
	if ino := inode(t, filepath.Join(vols, "v.img")); spares[ino] == "" {
		t.Fatalf("v's image (inode %d) is none of the spares %v", ino, spares)
	}
	if in, err := e.d.Get(testCtx(t), "v"); err != nil || in.Golden != "prj" || in.Generation != 1 {
		t.Fatalf("Get(v) after a claim = %+v, %v", in, err)
	}
	kept := keptMounts(t, e)
	mp := e.mount(t, "v", "c")
	bound := false
	for _, k := range kept {
		bound = bound || devOf(t, k) == devOf(t, mp)
	}
	if !bound {
		t.Fatalf("v's Mount did not bind its spare's XFS (kept mounts %v)", kept)
	}
	writeFile(t, filepath.Join(mp, "mine"), "v")
	e.unmount(t, "v", "c")
	waitSpares(t, e, "prj", 2) // restocked

	// A promotion makes generation 2: the spares of 1 are retired and 2's are made.
	if _, err := e.d.Promote(testCtx(t), "v", "prj"); err != nil {
		t.Fatal(err)
	}
	waitSparesRetired(t, e, "prj", 2, spares, "the promotion")
	e.create(t, "w", map[string]string{"golden": "prj"})
	if in, err := e.d.Get(testCtx(t), "w"); err != nil || in.Generation != 2 {
		t.Fatalf("Get(w) after the promotion = %+v, %v; want generation 2", in, err)
	}
	wmp := e.mount(t, "w", "c")
	if got := readFile(t, filepath.Join(wmp, "mine")); got != "v" {
		t.Fatalf("w, of generation 2, reads %q", got)
	}
	e.unmount(t, "w", "c")

	// A restart adopts the spares it finds: the same files, mounted again or still.
	before := waitSpares(t, e, "prj", 2)
	e.open(t)
	after := waitSpares(t, e, "prj", 2)
	if len(intersect(before, after)) != 2 {
		t.Fatalf("after a restart the spares are %v, were %v: not adopted", after, before)
	}

	// A golden removed and made again under the same name and number: its spares of the old
	// generation 1 must not be claimed for the new one (which is v, with its file). The worker
	// is stopped first, so the old spares are still ready when x is created, as they are between
	// a golden rm and the worker's next pass; without that they would be retired before the
	// claim, and the check of the generation's identity never reached.
	e.importTree(t, "q")
	oldQ := waitSpares(t, e, "q", 2)
	reflinkstore.StopSpares(e.store)
	if err := e.d.RemoveGolden(testCtx(t), "q", false); err != nil {
		t.Fatal(err)
	}
	if g, err := e.d.Promote(testCtx(t), "v", "q"); err != nil || g.Number != 1 {
		t.Fatalf("Promote(v, q) = %+v, %v; want generation 1", g, err)
	}
	if st, err := e.store.Status(testCtx(t)); err != nil || st.SparesReady["q"] != 2 {
		t.Fatalf("with the worker stopped, the removed q's spares are not ready for the claim to refuse: %+v, %v", st, err)
	}
	e.create(t, "x", map[string]string{"golden": "q"})
	xmp := e.mount(t, "x", "c")
	if _, err := os.Stat(filepath.Join(xmp, "mine")); err != nil {
		t.Fatalf("x, of the new generation 1 of q, lacks v's file (a spare of the removed q?): %v", err)
	}
	e.unmount(t, "x", "c")
	for _, name := range oldQ {
		if _, err := os.Stat(filepath.Join(e.root, "store", "spares", name)); err != nil {
			t.Fatalf("the removed q's spare %s was taken: %v", name, err)
		}
	}
	// A restart, whose worker retires the old spares and makes the new q's. Its start adopts
	// every spare it finds and the worker's first pass then retires those of another generation,
	// so for a moment the old ones are listed (a claim would still refuse them, as above).
	e.open(t)
	waitSparesRetired(t, e, "q", 2, oldQ, "a restart")
	for _, v := range []string{"v", "w", "x"} {
		e.remove(t, v)
	}
	if err := e.d.RemoveGolden(testCtx(t), "q", false); err != nil {
		t.Fatal(err)
	}

	// The golden goes: so do its spares.
	if err := e.d.RemoveGolden(testCtx(t), "prj", false); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(100 * time.Millisecond) {
		st, err := e.store.Status(testCtx(t))
		if err == nil && len(st.SparesReady) == 0 && len(inodes(t, filepath.Join(e.root, "store", "spares"))) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a minute after its golden was removed, spares remain: %+v (%v)", st.SparesReady, err)
		}
	}
	e.finish(t)
}

// waitSparesRetired waits, up to a minute after what happened (after), until project has n
// spares ready and none of them is one of old. It compares names, not inodes: a retired spare's
// inode number is soon another file's.
func waitSparesRetired(t *testing.T, e *env, project string, n int, old map[uint64]string, after string) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(100 * time.Millisecond) {
		w := waitSpares(t, e, project, n)
		stale := intersect(w, old)
		if len(stale) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("a minute after %s, %s's spares %v are still ready (ready: %v)", after, project, stale, w)
		}
	}
}

// intersect lists the names in both a and b.
func intersect(a, b map[uint64]string) []string {
	names := map[string]bool{}
	for _, n := range b {
		names[n] = true
	}
	var out []string
	for _, n := range a {
		if names[n] {
			out = append(out, n)
		}
	}
	return out
}
