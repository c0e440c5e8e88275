// Package drivertest is the conformance suite that every zgolden backend must pass against real
// storage: the same tests run on the reflink store on the host and on ZFS in the qemu guest.
package drivertest

import (
	"context"
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

	"github.com/sirupsen/logrus"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/xfsutil"
)

// Env is one test's fresh storage.
type Env struct {
	// Open opens the backend on this test's storage. The suite calls it again on the same storage
	// to simulate a plugin restart (kill -9 included: nothing is closed first).
	Open func(t *testing.T) driver.Backend
	// Inventory lists every object the backend holds on this test's storage (datasets and
	// snapshots, image files, attached loop devices), so the suite can prove nothing leaked.
	Inventory func(t *testing.T) []string
	// AfterRemove, if set, runs extra backend-specific checks once every volume is removed
	// (no DDT entries on ZFS, for example).
	AfterRemove func(t *testing.T)
}

// Run runs the suite. newEnv must give each call fresh storage and clean it up with t.Cleanup.
func Run(t *testing.T, newEnv func(t *testing.T) Env) {
	tests := []struct {
		name string
		fn   func(t *testing.T, h *harness)
	}{
		{"PlainVolumeLifecycle", testPlainLifecycle},
		{"ColdStart", testColdStart},
		{"ImportAndClone", testImportAndClone},
		{"PromoteGenerations", testPromoteGenerations},
		{"PromoteFromOtherOrigins", testPromoteOtherOrigins},
		{"ReclaimKeepsUsedGenerations", testReclaim},
		{"MountReferences", testMountReferences},
		{"BusyUnmount", testBusyUnmount},
		{"Restart", testRestart},
		{"InvalidRequestsCreateNothing", testInvalid},
		{"CreateIsIdempotent", testIdempotent},
		{"RemoveGoldenRefusesDependents", testRemoveGolden},
		{"ConcurrentCreates", testConcurrentCreates},
		{"CreatesDuringPromotion", testCreatesDuringPromotion},
		{"ImportBlocksOnlyItsProject", testImportBlocksOnlyItsProject},
		{"ReserveRefusesNewWork", testReserve},
		{"Fork", testFork},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, newEnv(t))
			tc.fn(t, h)
		})
	}
}

type harness struct {
	env       Env
	d         *driver.Driver
	backend   driver.Backend
	reserve   driver.Reserve // for the next open
	mountRoot string
	stateDir  string
	baseline  []string
}

var log = logrus.New()

func newHarness(t *testing.T, env Env) *harness {
	dir := t.TempDir()
	h := &harness{env: env, mountRoot: filepath.Join(dir, "mnt"), stateDir: filepath.Join(dir, "state")}
	// Registered after TempDir, so it runs before TempDir's removal: never delete through a mount.
	t.Cleanup(func() {
		mounts, _ := xfsutil.MountsUnder(h.mountRoot)
		for i := len(mounts) - 1; i >= 0; i-- {
			if err := xfsutil.Unmount(context.Background(), mounts[i].Mountpoint); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		}
	})
	h.open(t)
	h.baseline = env.Inventory(t)
	return h
}

// open builds a driver on the test's storage, as a (re)started plugin does.
func (h *harness) open(t *testing.T) {
	t.Helper()
	log.SetLevel(logrus.WarnLevel)
	if testing.Verbose() {
		log.SetLevel(logrus.InfoLevel)
	}
	h.backend = h.env.Open(t)
	d, err := driver.New(ctx(t), driver.Config{
		Backend: h.backend, MountRoot: h.mountRoot, StateDir: h.stateDir, Reserve: h.reserve,
		// Long enough for any import a test runs, even under emulation: a Create that gives up
		// waiting would turn ImportBlocksOnlyItsProject's clone into an error.
		DefaultSize: 1 << 30, ImportWait: 4 * time.Minute, Log: logrus.NewEntry(log),
	})
	if err != nil {
		t.Fatalf("driver.New: %v", err)
	}
	h.d = d
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	return c
}

func (h *harness) create(t *testing.T, name string, opts map[string]string) {
	t.Helper()
	if err := h.d.Create(ctx(t), name, opts); err != nil {
		t.Fatalf("Create(%s, %v): %v", name, opts, err)
	}
}

func (h *harness) mount(t *testing.T, name, id string) string {
	t.Helper()
	mp, err := h.d.Mount(ctx(t), name, id)
	if err != nil {
		t.Fatalf("Mount(%s, %s): %v", name, id, err)
	}
	if m, err := xfsutil.MountedAt(mp); err != nil || m == nil {
		t.Fatalf("Mount(%s) returned %s, but nothing is mounted there (%v)", name, mp, err)
	}
	return mp
}

func (h *harness) unmount(t *testing.T, name, id string) {
	t.Helper()
	if err := h.d.Unmount(ctx(t), name, id); err != nil {
		t.Fatalf("Unmount(%s, %s): %v", name, id, err)
	}
}

func (h *harness) remove(t *testing.T, name string) {
	t.Helper()
	if err := h.d.Remove(ctx(t), name); err != nil {
		t.Fatalf("Remove(%s): %v", name, err)
	}
}

func (h *harness) mounted(t *testing.T, name string) bool {
	t.Helper()
	m, err := xfsutil.MountedAt(filepath.Join(h.mountRoot, name))
	if err != nil {
		t.Fatal(err)
	}
	return m != nil
}

// importGolden imports a MakeTree tree as project's next generation.
func (h *harness) importGolden(t *testing.T, project string) driver.Generation {
	t.Helper()
	src := t.TempDir()
	MakeTree(t, src)
	var calls int
	gen, err := h.d.Import(ctx(t), project, driver.KindBlock, src, driver.ImportOptions{}, func(driver.Progress) { calls++ })
	if err != nil {
		t.Fatalf("Import: %v", err)
	}
	if calls == 0 {
		t.Fatalf("Import reported no progress")
	}
	return gen
}

// removeAllAndCheckLeaks removes every volume and golden, then checks the backend holds exactly
// what it held before the test and nothing is mounted under the mount root.
func (h *harness) removeAllAndCheckLeaks(t *testing.T) {
	t.Helper()
	for _, v := range h.d.List() {
		for v.Mounts > 0 {
			t.Fatalf("volume %s is still mounted by %d callers at the end of the test", v.Name, v.Mounts)
		}
		h.remove(t, v.Name)
	}
	gs, err := h.d.Goldens(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range gs {
		if err := h.d.RemoveGolden(ctx(t), g.Project, false); err != nil {
			t.Fatalf("RemoveGolden(%s): %v", g.Project, err)
		}
	}
	if got := h.env.Inventory(t); !slices.Equal(got, h.baseline) {
		t.Fatalf("leaked objects:\n got %q\nwant %q", got, h.baseline)
	}
	if mounts, _ := xfsutil.MountsUnder(h.mountRoot); len(mounts) > 0 {
		t.Fatalf("leaked mounts: %+v", mounts)
	}
	if entries, _ := os.ReadDir(filepath.Join(h.stateDir, "mounts")); len(entries) > 0 {
		t.Fatalf("leaked mount reference files: %v", entries)
	}
	if h.env.AfterRemove != nil {
		h.env.AfterRemove(t)
	}
}

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

func testPlainLifecycle(t *testing.T, h *harness) {
	h.create(t, "plain", map[string]string{"size": "1G"})
	if p, err := h.d.Path("plain"); err != nil || p != "" {
		t.Fatalf("Path of an unmounted volume = %q, %v; want empty", p, err)
	}
	mp := h.mount(t, "plain", "c1")
	writeFile(t, filepath.Join(mp, "hello"), "world")
	if p, _ := h.d.Path("plain"); p != mp {
		t.Fatalf("Path = %q, want %q", p, mp)
	}
	in, err := h.d.Get(ctx(t), "plain")
	if err != nil {
		t.Fatal(err)
	}
	if in.Mounts != 1 || in.Usage == nil || in.Usage.Size < 1<<30 || in.Golden != "" || in.CreatedAt.IsZero() {
		t.Fatalf("Get = %+v (usage %+v)", in, in.Usage)
	}
	h.unmount(t, "plain", "c1")
	if h.mounted(t, "plain") {
		t.Fatal("still mounted after the last unmount")
	}
	mp = h.mount(t, "plain", "c2")
	if got := readFile(t, filepath.Join(mp, "hello")); got != "world" {
		t.Fatalf("data lost across unmount: %q", got)
	}
	h.unmount(t, "plain", "c2")
	h.removeAllAndCheckLeaks(t)
	if _, err := os.Stat(filepath.Join(h.mountRoot, "plain")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("mountpoint directory left behind: %v", err)
	}
}

func testColdStart(t *testing.T, h *harness) {
	h.create(t, "cold", map[string]string{"golden": "nothing_yet"})
	in, err := h.d.Get(ctx(t), "cold")
	if err != nil {
		t.Fatal(err)
	}
	if !in.ColdStart || in.Golden != "nothing_yet" || in.Generation != 0 {
		t.Fatalf("cold start not reported: %+v", in.Volume)
	}
	mp := h.mount(t, "cold", "c")
	entries, _ := os.ReadDir(mp)
	for _, e := range entries {
		if e.Name() != "lost+found" {
			t.Fatalf("cold-start volume is not empty: %s", e.Name())
		}
	}
	h.unmount(t, "cold", "c")
	err = h.d.Create(ctx(t), "denied", map[string]string{"golden": "nothing_yet", "cold": "deny"})
	if !errors.Is(err, driver.ErrNoGolden) {
		t.Fatalf("cold=deny without a golden: err = %v, want ErrNoGolden", err)
	}
	h.removeAllAndCheckLeaks(t)
}

func testImportAndClone(t *testing.T, h *harness) {
	gen := h.importGolden(t, "prj_x")
	if gen.Number != 1 || gen.Project != "prj_x" {
		t.Fatalf("import made %+v, want generation 1 of prj_x", gen)
	}
	h.create(t, "a", map[string]string{"golden": "prj_x"})
	h.create(t, "b", map[string]string{"golden": "prj_x"})
	// Both clones carry the golden's XFS UUID: mounting them at once needs nouuid.
	ma, mb := h.mount(t, "a", "ca"), h.mount(t, "b", "cb")
	CheckTree(t, ma)
	CheckTree(t, mb)
	writeFile(t, filepath.Join(ma, "only-a"), "a")
	writeFile(t, filepath.Join(mb, "README"), "changed in b")
	if _, err := os.Stat(filepath.Join(mb, "only-a")); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("a write in volume a is visible in volume b")
	}
	if got := readFile(t, filepath.Join(ma, "README")); got != "golden content\n" {
		t.Fatalf("a write in volume b changed volume a: %q", got)
	}
	in, _ := h.d.Get(ctx(t), "a")
	if in.Golden != "prj_x" || in.Generation != 1 || in.ColdStart {
		t.Fatalf("Get(a) = %+v", in.Volume)
	}
	gs, err := h.d.Goldens(ctx(t))
	if err != nil || len(gs) != 1 || len(gs[0].Generations) != 1 {
		t.Fatalf("Goldens = %+v, %v", gs, err)
	}
	if deps := gs[0].Generations[0].Dependents; !slices.Equal(sorted(deps), []string{"a", "b"}) {
		t.Fatalf("generation 1 dependents = %v, want [a b]", deps)
	}
	h.unmount(t, "a", "ca")
	h.unmount(t, "b", "cb")
	// A remount after an unmount needs nouuid too (the origin's UUID is still registered when
	// another clone is mounted).
	mb = h.mount(t, "b", "cb2")
	ma = h.mount(t, "a", "ca2")
	if got := readFile(t, filepath.Join(mb, "README")); got != "changed in b" {
		t.Fatalf("volume b lost its write: %q", got)
	}
	h.unmount(t, "a", "ca2")
	h.unmount(t, "b", "cb2")
	h.removeAllAndCheckLeaks(t)
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}

func testPromoteGenerations(t *testing.T, h *harness) {
	h.importGolden(t, "prj")
	// Generation 2: a session built on generation 1, promoted while mounted (frozen).
	h.create(t, "s1", map[string]string{"golden": "prj"})
	mp := h.mount(t, "s1", "c1")
	writeFile(t, filepath.Join(mp, "gen"), "2")
	g2, err := h.d.Promote(ctx(t), "s1", "prj")
	if err != nil {
		t.Fatalf("Promote mounted s1: %v", err)
	}
	if g2.Number != 2 {
		t.Fatalf("promotion made generation %d, want 2", g2.Number)
	}
	writeFile(t, filepath.Join(mp, "after-promote"), "s1 still writable")
	h.unmount(t, "s1", "c1")
	// Generation 3: promoted unmounted, from a clone of generation 2.
	h.create(t, "s2", map[string]string{"golden": "prj"})
	mp = h.mount(t, "s2", "c2")
	if got := readFile(t, filepath.Join(mp, "gen")); got != "2" {
		t.Fatalf("clone of the newest generation reads gen=%q, want 2", got)
	}
	if _, err := os.Stat(filepath.Join(mp, "after-promote")); err == nil {
		t.Fatal("a write made after the promotion leaked into the generation")
	}
	writeFile(t, filepath.Join(mp, "gen"), "3")
	h.unmount(t, "s2", "c2")
	if g3, err := h.d.Promote(ctx(t), "s2", "prj"); err != nil || g3.Number != 3 {
		t.Fatalf("Promote s2: %+v, %v", g3, err)
	}
	// The sources can go; the generations must not depend on them.
	h.remove(t, "s1")
	h.remove(t, "s2")
	for gen, want := range map[string]string{"1": "", "2": "2", "3": "3", "": "3"} {
		name := "check" + gen
		opts := map[string]string{"golden": "prj"}
		if gen != "" {
			opts["generation"] = gen
		}
		h.create(t, name, opts)
		mp := h.mount(t, name, "c")
		CheckTree(t, mp)
		got, err := os.ReadFile(filepath.Join(mp, "gen"))
		if want == "" && err == nil || want != "" && string(got) != want {
			t.Fatalf("generation %q reads gen=%q (%v), want %q", gen, got, err, want)
		}
		h.unmount(t, name, "c")
	}
	err = h.d.Create(ctx(t), "nope", map[string]string{"golden": "prj", "generation": "9"})
	if !errors.Is(err, driver.ErrNotFound) {
		t.Fatalf("generation 9: err = %v, want ErrNotFound", err)
	}
	h.removeAllAndCheckLeaks(t)
}

// testPromoteOtherOrigins promotes volumes that are not clones of the newest generation: a cold
// start (no origin at all) and a clone of an older generation.
func testPromoteOtherOrigins(t *testing.T, h *harness) {
	h.create(t, "first", map[string]string{"golden": "fresh"}) // a cold start
	mp := h.mount(t, "first", "c")
	writeFile(t, filepath.Join(mp, "built"), "first build")
	h.unmount(t, "first", "c")
	if g, err := h.d.Promote(ctx(t), "first", "fresh"); err != nil || g.Number != 1 {
		t.Fatalf("Promote cold start: %+v, %v", g, err)
	}
	h.create(t, "old", map[string]string{"golden": "fresh"})  // on generation 1
	h.create(t, "next", map[string]string{"golden": "fresh"}) // on generation 1, promoted to 2
	if _, err := h.d.Promote(ctx(t), "next", "fresh"); err != nil {
		t.Fatal(err)
	}
	h.remove(t, "first") // the source of generation 1 must not be needed by it
	mp = h.mount(t, "old", "c")
	writeFile(t, filepath.Join(mp, "built"), "old build")
	h.unmount(t, "old", "c")
	if g, err := h.d.Promote(ctx(t), "old", "fresh"); err != nil || g.Number != 3 {
		t.Fatalf("Promote a clone of an older generation: %+v, %v", g, err)
	}
	h.remove(t, "old")
	h.remove(t, "next")
	for gen, want := range map[string]string{"1": "first build", "3": "old build"} {
		h.create(t, "g"+gen, map[string]string{"golden": "fresh", "generation": gen})
		mp := h.mount(t, "g"+gen, "c")
		if got := readFile(t, filepath.Join(mp, "built")); got != want {
			t.Fatalf("generation %s reads %q, want %q", gen, got, want)
		}
		h.unmount(t, "g"+gen, "c")
	}
	h.removeAllAndCheckLeaks(t)
}

func testReclaim(t *testing.T, h *harness) {
	h.importGolden(t, "prj")
	h.create(t, "on1", map[string]string{"golden": "prj"})
	for i := 0; i < 2; i++ { // generations 2 and 3
		name := fmt.Sprintf("p%d", i)
		h.create(t, name, map[string]string{"golden": "prj"})
		if _, err := h.d.Promote(ctx(t), name, "prj"); err != nil {
			t.Fatal(err)
		}
		h.remove(t, name)
	}
	removed, err := h.d.Reclaim(ctx(t), "prj", 1)
	if err != nil {
		t.Fatal(err)
	}
	if len(removed) != 1 || removed[0].Number != 2 {
		t.Fatalf("reclaimed %+v, want only generation 2 (1 is in use, 3 is the newest)", removed)
	}
	gs, _ := h.d.Goldens(ctx(t))
	var nums []int
	for _, g := range gs[0].Generations {
		nums = append(nums, g.Number)
	}
	if !slices.Equal(nums, []int{1, 3}) {
		t.Fatalf("generations after reclaim = %v, want [1 3]", nums)
	}
	mp := h.mount(t, "on1", "c")
	CheckTree(t, mp) // the volume on the kept generation is intact
	h.unmount(t, "on1", "c")
	h.removeAllAndCheckLeaks(t)
}

func testMountReferences(t *testing.T, h *harness) {
	h.create(t, "shared", nil)
	mp := h.mount(t, "shared", "c1")
	if mp2 := h.mount(t, "shared", "c2"); mp2 != mp {
		t.Fatalf("second mount at %s, first at %s", mp2, mp)
	}
	h.mount(t, "shared", "c2") // docker cp reuses its container's ID: counted once
	h.unmount(t, "shared", "c1")
	if !h.mounted(t, "shared") {
		t.Fatal("unmounted while c2 still holds it (moby #17585)")
	}
	h.unmount(t, "shared", "unknown-id") // must be a no-op
	h.unmount(t, "shared", "c1")         // repeated: a no-op
	if !h.mounted(t, "shared") {
		t.Fatal("an unknown or repeated unmount took the mount away")
	}
	if err := h.d.Remove(ctx(t), "shared"); !errors.Is(err, driver.ErrBusy) {
		t.Fatalf("Remove of a mounted volume: err = %v, want ErrBusy", err)
	}
	h.unmount(t, "shared", "c2")
	if h.mounted(t, "shared") {
		t.Fatal("still mounted after the last caller unmounted")
	}
	if err := h.d.Unmount(ctx(t), "no-such-volume", "x"); err != nil {
		t.Fatalf("Unmount of an unknown volume: %v", err)
	}
	if _, err := h.d.Mount(ctx(t), "no-such-volume", "x"); !errors.Is(err, driver.ErrNotFound) {
		t.Fatalf("Mount of an unknown volume: err = %v, want ErrNotFound", err)
	}
	h.removeAllAndCheckLeaks(t)
}

func testBusyUnmount(t *testing.T, h *harness) {
	h.create(t, "busy", nil)
	mp := h.mount(t, "busy", "c")
	f, err := os.Create(filepath.Join(mp, "held-open"))
	if err != nil {
		t.Fatal(err)
	}
	err = h.d.Unmount(ctx(t), "busy", "c")
	if !errors.Is(err, driver.ErrBusy) {
		f.Close()
		t.Fatalf("Unmount with an open file: err = %v, want ErrBusy", err)
	}
	if !h.mounted(t, "busy") {
		t.Fatal("a busy unmount must leave the volume mounted, never lazily detached")
	}
	f.Close()
	h.unmount(t, "busy", "c") // the reference survived the failed attempt
	h.removeAllAndCheckLeaks(t)
}

func testRestart(t *testing.T, h *harness) {
	h.importGolden(t, "prj")
	h.create(t, "kept", map[string]string{"golden": "prj"})
	h.create(t, "idle", nil)
	mp := h.mount(t, "kept", "c1")
	h.mount(t, "kept", "c2")
	writeFile(t, filepath.Join(mp, "before-restart"), "x")

	h.open(t) // a new driver on the same storage: what kill -9 and a restart leave

	names := []string{}
	for _, v := range h.d.List() {
		names = append(names, v.Name)
	}
	if !slices.Equal(names, []string{"idle", "kept"}) {
		t.Fatalf("after restart List = %v", names)
	}
	if p, _ := h.d.Path("kept"); p != mp {
		t.Fatalf("after restart Path(kept) = %q, want %q", p, mp)
	}
	in, _ := h.d.Get(ctx(t), "kept")
	if in.Mounts != 2 || in.Golden != "prj" || in.Generation != 1 {
		t.Fatalf("after restart Get(kept) = %+v", in)
	}
	h.unmount(t, "kept", "c1")
	if !h.mounted(t, "kept") {
		t.Fatal("after restart, unmounting one of two callers unmounted the volume")
	}
	h.unmount(t, "kept", "c2")
	if h.mounted(t, "kept") {
		t.Fatal("after restart, the last unmount left the volume mounted")
	}
	mp = h.mount(t, "kept", "c3") // a remount after a restart (nouuid again)
	if got := readFile(t, filepath.Join(mp, "before-restart")); got != "x" {
		t.Fatalf("data lost across restart: %q", got)
	}
	h.unmount(t, "kept", "c3")
	h.removeAllAndCheckLeaks(t)
}

func testInvalid(t *testing.T, h *harness) {
	h.importGolden(t, "prj")
	before := h.env.Inventory(t)
	bad := []struct {
		name string
		opts map[string]string
	}{
		{"../etc", nil}, {"a/b", nil}, {"a@b", nil}, {"a%b", nil}, {"a b", nil}, {"", nil},
		{"a\x00b", nil}, {"a\nb", nil}, {"ünïcode", nil}, {string(make([]byte, 300)), nil},
		{"x", map[string]string{"mountpoint": "/etc"}}, {"x", map[string]string{"dedup": "on"}},
		{"x", map[string]string{"canmount": "on"}}, {"x", map[string]string{"size": "0"}},
		{"x", map[string]string{"size": "-5G"}}, {"x", map[string]string{"size": "99999999999999999999G"}},
		{"x", map[string]string{"size": "10Q"}}, {"x", map[string]string{"golden": "../prj"}},
		{"x", map[string]string{"golden": "prj", "generation": "42"}},
		{"x", map[string]string{"golden": "prj", "generation": "-1"}},
		{"x", map[string]string{"golden": "prj", "size": "1M"}},
	}
	for _, b := range bad {
		err := h.d.Create(ctx(t), b.name, b.opts)
		if err == nil {
			t.Errorf("Create(%q, %v) succeeded; want an error", b.name, b.opts)
			continue
		}
		if !errors.Is(err, driver.ErrInvalid) && !errors.Is(err, driver.ErrNotFound) {
			t.Errorf("Create(%q, %v): %v is neither ErrInvalid nor ErrNotFound", b.name, b.opts, err)
		}
	}
	if _, err := h.d.Promote(ctx(t), "x", "../../etc"); !errors.Is(err, driver.ErrInvalid) {
		t.Errorf("Promote to a project with path parts: %v", err)
	}
	if err := h.d.Remove(ctx(t), "../../x"); !errors.Is(err, driver.ErrInvalid) {
		t.Errorf("Remove with path parts: %v", err)
	}
	if got := h.env.Inventory(t); !slices.Equal(got, before) {
		t.Fatalf("invalid requests created objects:\n got %q\nwant %q", got, before)
	}
	if len(h.d.List()) != 0 {
		t.Fatalf("invalid requests registered volumes: %+v", h.d.List())
	}
	h.removeAllAndCheckLeaks(t)
}

func testIdempotent(t *testing.T, h *harness) {
	h.create(t, "v", map[string]string{"golden": "p1"})
	h.create(t, "v", map[string]string{"golden": "p1"}) // Docker retries a slow Create
	if err := h.d.Create(ctx(t), "v", map[string]string{"golden": "p2"}); !errors.Is(err, driver.ErrExists) {
		t.Fatalf("Create with another golden: err = %v, want ErrExists", err)
	}
	if err := h.d.Remove(ctx(t), "v"); err != nil {
		t.Fatal(err)
	}
	if err := h.d.Remove(ctx(t), "v"); err != nil { // a retried Remove
		t.Fatalf("second Remove: %v", err)
	}
	h.removeAllAndCheckLeaks(t)
}

func testRemoveGolden(t *testing.T, h *harness) {
	h.importGolden(t, "prj")
	h.create(t, "dep", map[string]string{"golden": "prj"})
	if err := h.d.RemoveGolden(ctx(t), "prj", false); !errors.Is(err, driver.ErrHasDependents) {
		t.Fatalf("RemoveGolden with a dependent volume: err = %v, want ErrHasDependents", err)
	}
	mp := h.mount(t, "dep", "c")
	CheckTree(t, mp)
	h.unmount(t, "dep", "c")
	h.remove(t, "dep")
	if err := h.d.RemoveGolden(ctx(t), "prj", false); err != nil {
		t.Fatalf("RemoveGolden without dependents: %v", err)
	}
	h.removeAllAndCheckLeaks(t)
}

func testConcurrentCreates(t *testing.T, h *harness) {
	h.importGolden(t, "prj")
	const n = 8
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			name := fmt.Sprintf("c%d", i)
			if err := h.d.Create(ctx(t), name, map[string]string{"golden": "prj"}); err != nil {
				errs <- err
				return
			}
			mp, err := h.d.Mount(ctx(t), name, "id")
			if err != nil {
				errs <- err
				return
			}
			if _, err := os.Stat(filepath.Join(mp, "README")); err != nil {
				errs <- fmt.Errorf("%s: %w", name, err)
			}
			errs <- h.d.Unmount(ctx(t), name, "id")
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if got := len(h.d.List()); got != n {
		t.Fatalf("List has %d volumes, want %d", got, n)
	}
	h.removeAllAndCheckLeaks(t)
}

// testCreatesDuringPromotion: Creates racing promotions clone the old or the new generation,
// never an empty or half-made one (Helix saw empty volumes here).
func testCreatesDuringPromotion(t *testing.T, h *harness) {
	h.importGolden(t, "prj")
	const promotions = 3
	done := make(chan struct{})
	results := make(chan error, 64)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // a stream of Creates until the promotions are over
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-done:
				return
			default:
			}
			name := fmt.Sprintf("racer%d", i)
			if err := h.d.Create(ctx(t), name, map[string]string{"golden": "prj"}); err != nil {
				results <- fmt.Errorf("Create %s during promotion: %w", name, err)
				return
			}
			results <- h.checkRacer(t, name)
		}
	}()
	for i := 0; i < promotions; i++ {
		src := fmt.Sprintf("src%d", i)
		h.create(t, src, map[string]string{"golden": "prj"})
		mp := h.mount(t, src, "c")
		writeFile(t, filepath.Join(mp, "gen"), fmt.Sprint(i+2))
		h.unmount(t, src, "c")
		if _, err := h.d.Promote(ctx(t), src, "prj"); err != nil {
			t.Fatal(err)
		}
	}
	close(done)
	wg.Wait()
	close(results)
	n := 0
	for err := range results {
		n++
		if err != nil {
			t.Error(err)
		}
	}
	if n == 0 {
		t.Fatal("no Create ran during the promotions; the test proved nothing")
	}
	t.Logf("%d creates raced %d promotions", n, promotions)
	h.removeAllAndCheckLeaks(t)
}

// checkRacer verifies a volume made during promotions holds a whole generation.
func (h *harness) checkRacer(t *testing.T, name string) error {
	mp, err := h.d.Mount(ctx(t), name, "check")
	if err != nil {
		return err
	}
	defer func() {
		if err := h.d.Unmount(ctx(t), name, "check"); err != nil {
			t.Error(err)
		}
	}()
	if _, err := os.Stat(filepath.Join(mp, "README")); err != nil {
		return fmt.Errorf("%s is not a whole generation: %w", name, err)
	}
	if b, err := os.ReadFile(filepath.Join(mp, "gen")); err == nil && (len(b) != 1 || b[0] < '2' || b[0] > '4') {
		return fmt.Errorf("%s reads gen=%q, which no generation holds", name, b)
	}
	return nil
}

// testImportBlocksOnlyItsProject: while a project's golden is being imported, Creates for other
// projects proceed and a Create for that project waits and then gets a clone, not a cold start.
func testImportBlocksOnlyItsProject(t *testing.T, h *harness) {
	src := t.TempDir()
	MakeTree(t, src)
	// Enough data that the copy takes a moment, so the Creates below overlap it.
	big, err := os.Create(filepath.Join(src, "big.bin"))
	if err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 1<<20)
	for i := range chunk {
		chunk[i] = byte(i * 7)
	}
	for i := 0; i < 192; i++ {
		if _, err := big.Write(chunk); err != nil {
			t.Fatal(err)
		}
	}
	big.Close()
	imported := make(chan error, 1)
	go func() {
		_, err := h.d.Import(ctx(t), "slow", driver.KindBlock, src, driver.ImportOptions{}, nil)
		imported <- err
	}()
	for deadline := time.Now().Add(time.Minute); ; {
		if _, running := h.d.ImportProgress("slow"); running {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the import never started")
		}
		time.Sleep(5 * time.Millisecond)
	}
	h.create(t, "other", map[string]string{"golden": "elsewhere"})
	_, stillRunning := h.d.ImportProgress("slow")
	h.create(t, "waiter", map[string]string{"golden": "slow"})
	if err := <-imported; err != nil {
		t.Fatal(err)
	}
	in, err := h.d.Get(ctx(t), "waiter")
	if err != nil {
		t.Fatal(err)
	}
	if in.ColdStart || in.Generation != 1 {
		t.Fatalf("a Create for the importing project got %+v, want a clone of generation 1", in.Volume)
	}
	t.Logf("the other project's Create returned while the import was still running: %v", stillRunning)
	if !stillRunning {
		t.Log("(the import finished before the other Create returned; the overlap was not observed this time)")
	}
	mp := h.mount(t, "waiter", "c")
	CheckTree(t, mp)
	h.unmount(t, "waiter", "c")
	h.removeAllAndCheckLeaks(t)
}

// testReserve: with a reserve just below the free space, a volume that writes past it makes new
// Creates, imports and promotions fail with ErrNoSpace, naming the free space and the reserve,
// while the running volume keeps writing; freeing the space (discard gives it back) lets Creates
// through again.
func testReserve(t *testing.T, h *harness) {
	h.create(t, "writer", map[string]string{"size": "2G"})
	mp := h.mount(t, "writer", "c1")
	sp, err := h.backend.Space(ctx(t))
	if err != nil || sp.Available < 1<<30 || sp.Total < sp.Available {
		t.Fatalf("Space = %+v, %v; want at least 1 GiB free of a larger total", sp, err)
	}
	h.reserve = driver.Reserve{Bytes: sp.Available - 128<<20}
	h.open(t) // a restart with --reserve; the volume stays mounted
	big := filepath.Join(mp, "big")
	writeRandom(t, big, 384<<20)
	start := time.Now()
	waitSpace(t, h, func(s driver.Space) bool { return s.Available < h.reserve.Bytes })
	t.Logf("the write reached the backend's free space in %s", time.Since(start).Round(time.Millisecond))
	time.Sleep(1100 * time.Millisecond) // past the driver's cached read of the space
	err = h.d.Create(ctx(t), "refused", nil)
	if !errors.Is(err, driver.ErrNoSpace) || !strings.Contains(err.Error(), "below the reserve") {
		t.Fatalf("Create below the reserve: %v; want ErrNoSpace naming the reserve", err)
	}
	src := t.TempDir()
	writeFile(t, filepath.Join(src, "f"), "x")
	if _, err := h.d.Import(ctx(t), "resproj", driver.KindBlock, src, driver.ImportOptions{}, nil); !errors.Is(err, driver.ErrNoSpace) {
		t.Errorf("Import below the reserve: %v; want ErrNoSpace", err)
	}
	if _, err := h.d.Promote(ctx(t), "writer", "resproj"); !errors.Is(err, driver.ErrNoSpace) {
		t.Errorf("Promote below the reserve: %v; want ErrNoSpace", err)
	}
	writeRandom(t, filepath.Join(mp, "more"), 1<<20) // a running volume keeps writing
	if err := os.Remove(big); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	// XFS discards freed extents (mounted with discard) in the background, about 30 s later;
	// fstrim discards them now. ZFS then frees them with its next txg.
	if out, err := exec.Command("fstrim", mp).CombinedOutput(); err != nil {
		t.Fatalf("fstrim %s: %v\n%s", mp, err, out)
	}
	var last error
	for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
		if last = h.d.Create(ctx(t), "refused", nil); last == nil {
			break
		}
	}
	if last != nil {
		t.Fatalf("Create after the space came back: %v", last)
	}
	t.Logf("the freed space let Creates through after %s", time.Since(start).Round(time.Millisecond))
	h.unmount(t, "writer", "c1")
	h.removeAllAndCheckLeaks(t)
}

func writeRandom(t *testing.T, path string, n int) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	x := uint64(len(path)) | 1
	for done := 0; done < n; done += len(buf) {
		for i := range buf { // incompressible: lz4 on ZFS would store zeros for free
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
			buf[i] = byte(x)
		}
		if _, err := f.Write(buf); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

// waitSpace waits, up to a minute, until the backend's space satisfies ok (ZFS accounts a
// write once its transaction group has synced).
func waitSpace(t *testing.T, h *harness, ok func(driver.Space) bool) {
	t.Helper()
	var sp driver.Space
	var err error
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(250 * time.Millisecond) {
		if sp, err = h.backend.Space(ctx(t)); err == nil && ok(sp) {
			return
		}
	}
	t.Fatalf("the backend's space never reached the wanted level: last %+v, %v", sp, err)
}

// testFork forks volumes (-o from=): mounted (frozen for the instant) and not, a fork of a fork,
// and a fork that is then promoted. The source is removed while its forks live, a restart keeps
// what each volume is, and at the end nothing is left: no fork snapshot, no image.
func testFork(t *testing.T, h *harness) {
	h.importGolden(t, "prj")
	h.create(t, "src", map[string]string{"golden": "prj"})
	mp := h.mount(t, "src", "c")
	writeFile(t, filepath.Join(mp, "state"), "one")
	h.create(t, "f1", map[string]string{"from": "src"}) // mounted: frozen for its snapshot
	writeFile(t, filepath.Join(mp, "state"), "two")     // after the fork: f1 must not see it
	h.unmount(t, "src", "c")
	h.create(t, "f2", map[string]string{"from": "src"})
	h.create(t, "f1", map[string]string{"from": "src"}) // Docker's retry of a slow Create: a no-op
	before := h.env.Inventory(t)
	if err := h.d.Create(ctx(t), "f3", map[string]string{"from": "missing"}); !errors.Is(err, driver.ErrNotFound) {
		t.Fatalf("fork of a missing volume: err = %v, want ErrNotFound", err)
	}
	if err := h.d.Create(ctx(t), "f3", map[string]string{"from": "src", "golden": "prj"}); !errors.Is(err, driver.ErrInvalid) {
		t.Fatalf("from= with golden=: err = %v, want ErrInvalid", err)
	}
	if err := h.d.Create(ctx(t), "f2", map[string]string{"from": "f1"}); !errors.Is(err, driver.ErrExists) {
		t.Fatalf("fork into an existing fork of another source: err = %v, want ErrExists", err)
	}
	if got := h.env.Inventory(t); !slices.Equal(got, before) {
		t.Fatalf("refused forks left objects:\n got %q\nwant %q", got, before)
	}
	for _, name := range []string{"f1", "f2"} {
		in, err := h.d.Get(ctx(t), name)
		if err != nil || in.ForkOf != "src" || in.Golden != "prj" || in.Generation != 1 || in.Kind != driver.KindBlock || in.ColdStart {
			t.Fatalf("Get(%s) = %+v, %v; want a block fork of src on generation 1 of prj", name, in.Volume, err)
		}
	}
	// The source goes first: no fork may need it.
	h.remove(t, "src")
	h.create(t, "f1b", map[string]string{"from": "f1"}) // a fork of a fork
	for name, want := range map[string]string{"f1": "one", "f2": "two", "f1b": "one"} {
		mp := h.mount(t, name, "c")
		CheckTree(t, mp)
		if got := readFile(t, filepath.Join(mp, "state")); got != want {
			t.Fatalf("fork %s reads state=%q, want %q", name, got, want)
		}
		h.unmount(t, name, "c")
	}
	h.open(t) // a restart: the forks keep their origin, and the removed source stays gone
	for name, want := range map[string]string{"f1": "src", "f2": "src", "f1b": "f1"} {
		if in, err := h.d.Get(ctx(t), name); err != nil || in.ForkOf != want {
			t.Fatalf("after a restart Get(%s) = %+v, %v; want a fork of %s", name, in.Volume, err, want)
		}
	}
	if _, err := h.d.Get(ctx(t), "src"); !errors.Is(err, driver.ErrNotFound) {
		t.Fatalf("the removed source came back after a restart: %v", err)
	}
	// A fork of a fork promoted: the new generation is its content.
	mp = h.mount(t, "f1b", "c")
	writeFile(t, filepath.Join(mp, "gen"), "from f1b")
	h.unmount(t, "f1b", "c")
	if g, err := h.d.Promote(ctx(t), "f1b", "prj"); err != nil || g.Number != 2 {
		t.Fatalf("Promote(f1b) = %+v, %v; want generation 2", g, err)
	}
	h.create(t, "g2", map[string]string{"golden": "prj"})
	mp = h.mount(t, "g2", "c")
	if got := readFile(t, filepath.Join(mp, "gen")) + "/" + readFile(t, filepath.Join(mp, "state")); got != "from f1b/one" {
		t.Fatalf("generation 2 reads %q, want the fork's content", got)
	}
	h.unmount(t, "g2", "c")
	// Every fork still counts against the golden it came from.
	gs, err := h.d.Goldens(ctx(t))
	if err != nil || len(gs) != 1 {
		t.Fatalf("Goldens = %+v, %v", gs, err)
	}
	var deps []string
	for _, g := range gs[0].Generations {
		deps = append(deps, g.Dependents...)
	}
	if want := []string{"f1", "f1b", "f2", "g2"}; !slices.Equal(sorted(deps), want) {
		t.Fatalf("the golden's dependents are %v, want %v", sorted(deps), want)
	}
	if err := h.d.RemoveGolden(ctx(t), "prj", false); !errors.Is(err, driver.ErrHasDependents) {
		t.Fatalf("RemoveGolden with forks alive: err = %v, want ErrHasDependents", err)
	}
	h.removeAllAndCheckLeaks(t)
}
