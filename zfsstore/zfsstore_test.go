package zfsstore_test

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/driver/drivertest"
	"github.com/zgolden/zgolden/tests/harness"
	"github.com/zgolden/zgolden/xfsutil"
	"github.com/zgolden/zgolden/zfsstore"
	"github.com/zgolden/zgolden/zfsutil"
)

func open(t *testing.T, parent, workDir string, adopt bool) (*zfsstore.Store, error) {
	t.Helper()
	l := logrus.New()
	l.SetLevel(logrus.WarnLevel)
	return zfsstore.New(context.Background(), zfsstore.Config{
		Parent: parent, WorkDir: workDir, DefaultSize: 1 << 30, Discard: true, Adopt: adopt, Log: logrus.NewEntry(l),
	})
}

func mustOpen(t *testing.T, parent, workDir string) *zfsstore.Store {
	return mustOpenRecords(t, parent, workDir, "")
}

// mustOpenRecords opens a store with claims and removals recorded in records ("" for none).
func mustOpenRecords(t *testing.T, parent, workDir, records string) *zfsstore.Store {
	t.Helper()
	l := logrus.New()
	l.SetLevel(logrus.WarnLevel)
	s, err := zfsstore.New(context.Background(), zfsstore.Config{
		Parent: parent, WorkDir: workDir, DefaultSize: 1 << 30, Discard: true, RecordDir: records, Log: logrus.NewEntry(l),
	})
	if err != nil {
		t.Fatal(err)
	}
	// Before the parent's cleanup (t.Cleanup runs last-in first-out): the devices the store
	// holds open would make its destroy busy.
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	return s
}

// TestConformance runs the backend-independent suite on real ZFS (in the qemu guest).
func TestConformance(t *testing.T) {
	pool := harness.RequireZFS(t)
	drivertest.Run(t, func(t *testing.T) drivertest.Env {
		parent := harness.ZFSParent(t)
		work, records := t.TempDir(), t.TempDir()
		return drivertest.Env{
			// With a record directory, as zgolden serve always runs it: Remove records and
			// the worker destroys (removal.go).
			Open:      func(t *testing.T) driver.Backend { return mustOpenRecords(t, parent, work, records) },
			Inventory: func(t *testing.T) []string { return harness.ZFSInventory(t, parent, records) },
			AfterRemove: func(t *testing.T) {
				z := zfsutil.New(logrus.NewEntry(logrus.New()))
				n, err := z.DDTEntries(context.Background(), pool)
				if err != nil || n != 0 {
					t.Fatalf("zpool status -D %s: %d DDT entries (%v); zgolden must never create dedup-table entries", pool, n, err)
				}
			},
		}
	})
}

func zget(t *testing.T, ds, prop string) string {
	t.Helper()
	return strings.TrimSpace(harness.Run(t, "zfs", "get", "-H", "-p", "-o", "value", prop, ds))
}

// TestVolumeProperties checks what every volume gets whatever the pool says: dedup=off even under
// a dedup=on parent, sparse (no refreservation), the 8K volblocksize, and its zgolden:* state.
func TestVolumeProperties(t *testing.T) {
	parent := harness.ZFSParent(t)
	harness.Run(t, "zfs", "create", "-o", "dedup=on", parent)
	s := mustOpen(t, parent, t.TempDir())
	ctx := context.Background()
	v, err := s.Create(ctx, driver.Spec{Name: "v1", Kind: driver.KindBlock, Size: 2 << 30})
	if err != nil {
		t.Fatal(err)
	}
	ds := parent + "/vol/v1"
	for prop, want := range map[string]string{
		"dedup": "off", "refreservation": "0", "volblocksize": "8192", "volsize": "2147483648",
		"zgolden:state": "ready", "zgolden:kind": "block", "compression": "lz4",
	} {
		if got := zget(t, ds, prop); got != want {
			t.Errorf("%s %s = %q, want %q", ds, prop, got, want)
		}
	}
	if v.Source != ds || v.Size != 2<<30 {
		t.Errorf("Create returned %+v", v)
	}
	// The XFS inside has d_type (ftype=1), which Docker's overlay2 requires.
	out := harness.Run(t, "xfs_db", "-r", "-c", "version", zfsutil.DevicePath(ds))
	if !strings.Contains(out, "FTYPE") {
		t.Errorf("xfs_db version = %q, want FTYPE (ftype=1)", out)
	}
	if err := s.Remove(ctx, v); err != nil {
		t.Fatal(err)
	}
}

// zfsCount counts the zfs commands a store runs (zfsutil logs each at debug, as "zfs").
type zfsCount struct{ argv [][]string }

func (c *zfsCount) Levels() []logrus.Level { return []logrus.Level{logrus.DebugLevel} }
func (c *zfsCount) Fire(e *logrus.Entry) error {
	if e.Message == "zfs" {
		argv, _ := e.Data["argv"].([]string)
		c.argv = append(c.argv, argv)
	}
	return nil
}

// TestOpenRunsOneCommand: opening a store on a parent it made before runs one zfs command,
// given the versions the plugin read a moment earlier. Every restart pays it, and each zfs
// process costs a tenth of a second in the guest and more on a loaded host; seven of them
// (a get, four existence checks, two gets of the inherited properties) became this one.
func TestOpenRunsOneCommand(t *testing.T) {
	parent := harness.ZFSParent(t)
	first := mustOpen(t, parent, t.TempDir())
	_ = first.Close(context.Background())
	ctx := context.Background()
	l := logrus.New()
	l.SetLevel(logrus.DebugLevel)
	l.SetOutput(io.Discard)
	count := &zfsCount{}
	l.AddHook(count)
	v, err := zfsstore.Versions(ctx, zfsutil.New(logrus.NewEntry(logrus.New())), nil)
	if err != nil {
		t.Fatal(err)
	}
	s, err := zfsstore.New(ctx, zfsstore.Config{Parent: parent, WorkDir: t.TempDir(), DefaultSize: 1 << 30, Versions: &v, Log: logrus.NewEntry(l)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	if len(count.argv) != 1 || count.argv[0][0] != "list" {
		t.Errorf("opening an existing store ran %d zfs commands, want 1 listing: %v", len(count.argv), count.argv)
	}
	for _, root := range []string{parent + "/vol", parent + "/spare"} {
		if got := strings.TrimSpace(harness.Run(t, "zfs", "get", "-H", "-o", "value", "dedup,compression", root)); got != "off\nlz4" {
			t.Errorf("%s dedup,compression = %q, want off and lz4", root, got)
		}
	}
}

// TestRefusesForeignParent: a parent dataset holding things zgolden did not create is refused
// unless adopted, so a typo in --parent cannot hand zgolden someone else's datasets.
func TestRefusesForeignParent(t *testing.T) {
	parent := harness.ZFSParent(t)
	harness.Run(t, "zfs", "create", parent)
	harness.Run(t, "zfs", "create", parent+"/someone-elses")
	if _, err := open(t, parent, t.TempDir(), false); err == nil || !strings.Contains(err.Error(), "--adopt") {
		t.Fatalf("New on a foreign parent: err = %v, want a refusal naming --adopt", err)
	}
	if _, err := open(t, parent, t.TempDir(), true); err != nil {
		t.Fatalf("New with Adopt: %v", err)
	}
	if got := harness.ZFSInventory(t, parent); !slices.Contains(got, parent+"/someone-elses") {
		t.Fatalf("adopting destroyed a foreign dataset: %v", got)
	}
}

// TestLoadRepairsInterruptedWork fabricates what a crash at each step leaves in ZFS and checks
// that Load removes half-made things and rolls forward the steps that are safe to finish.
func TestLoadRepairsInterruptedWork(t *testing.T) {
	parent := harness.ZFSParent(t)
	work := t.TempDir()
	s := mustOpen(t, parent, work)
	ctx := context.Background()
	src := t.TempDir()
	drivertest.MakeTree(t, src)
	if _, err := driver.ImportTree(ctx, s, "prj", driver.KindBlock, src, func(driver.Progress) {}); err != nil {
		t.Fatal(err)
	}
	// A Create that died after `zfs create` but before its state became ready.
	harness.Run(t, "zfs", "create", "-s", "-V", "1G", "-o", "zgolden:state=creating", parent+"/vol/halfmade")
	// A clone of a generation without any zgolden property: a bare volume (bare.go), or a host
	// crash between a clone's two transaction groups (zfs_ioc_clone sets the properties in a
	// second one). Either way a complete volume, which Load keeps.
	gens := harness.Run(t, "zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-r", parent+"/golden/prj")
	harness.Run(t, "zfs", "clone", strings.Fields(gens)[0], parent+"/vol/bareclone")
	// An import that died mid-copy: its lineage is still marked importing.
	harness.Run(t, "zfs", "create", "-p", "-s", "-V", "1G", "-o", "zgolden:state=importing", parent+"/golden/other/g1")
	harness.Run(t, "zfs", "set", "zgolden:kind=block", parent+"/golden/other")
	// An import that died after its completion marker, before its snapshot.
	harness.Run(t, "zfs", "create", "-p", "-s", "-V", "1G", "-o", "zgolden:state=ready", parent+"/golden/third/g1")
	harness.Run(t, "zfs", "set", "zgolden:kind=block", parent+"/golden/third")
	// A promotion that died between its snapshot and the send: a volume with a snapshot.
	if _, err := s.Create(ctx, driver.Spec{Name: "session", Kind: driver.KindBlock, Golden: "prj"}); err != nil {
		t.Fatal(err)
	}
	harness.Run(t, "zfs", "snapshot", parent+"/vol/session@gen2")
	// A fork whose properties never came (a crash between its clone's two tasks): a clone of no
	// generation, without properties; it goes, and so does the snapshot it hung off.
	harness.Run(t, "zfs", "snapshot", parent+"/vol/session@fork-x")
	harness.Run(t, "zfs", "clone", parent+"/vol/session@fork-x", parent+"/vol/barefork")
	// A clone+promote that died before `zfs promote`.
	if _, err := s.Create(ctx, driver.Spec{Name: "coldvol", Kind: driver.KindBlock}); err != nil {
		t.Fatal(err)
	}
	harness.Run(t, "zfs", "snapshot", parent+"/vol/coldvol@gen1")
	harness.Run(t, "zfs", "create", "-o", "zgolden:kind=block", "-o", "canmount=off", parent+"/golden/fourth")
	harness.Run(t, "zfs", "clone", "-o", "zgolden:state=ready", parent+"/vol/coldvol@gen1", parent+"/golden/fourth/g1")

	s2 := mustOpen(t, parent, work) // the restart
	vols, err := s2.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, v := range vols {
		names = append(names, v.Name)
	}
	slices.Sort(names)
	if !slices.Equal(names, []string{"bareclone", "coldvol", "session"}) {
		t.Fatalf("Load returned %v, want [bareclone coldvol session] (halfmade and barefork destroyed)", names)
	}
	for _, v := range vols {
		if v.Name == "bareclone" && (v.Golden != "prj" || v.Generation != 1 || v.Kind != driver.KindBlock || v.CreatedAt.Unix() < 1e9) {
			t.Errorf("the bare clone loaded as %+v, want a block volume of prj generation 1 with its creation time", v)
		}
	}
	inv := harness.ZFSInventory(t, parent)
	for _, gone := range []string{parent + "/vol/halfmade", parent + "/vol/barefork", parent + "/vol/session@fork-x", parent + "/golden/other/g1", parent + "/vol/session@gen2"} {
		if slices.Contains(inv, gone) {
			t.Errorf("%s survived Load", gone)
		}
	}
	for _, kept := range []string{parent + "/golden/third/g1@gen1", parent + "/golden/fourth/g1@gen1"} {
		if !slices.Contains(inv, kept) {
			t.Errorf("%s was not rolled forward; inventory %v", kept, inv)
		}
	}
	if origin := zget(t, parent+"/vol/coldvol", "origin"); origin != parent+"/golden/fourth/g1@gen1" {
		t.Errorf("after the rolled-forward promote, coldvol's origin is %q", origin)
	}
	gs, err := s2.Goldens(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range gs {
		if g.Importing {
			t.Errorf("golden %s still marked importing after Load", g.Project)
		}
	}
}

// TestRemoveIsNotBlockedByUdev: destroy right after a create and a mount cycle, the moment udev
// and blkid are probing the device, must succeed (retrying "dataset is busy"; docs/design-facts.md, "Busy devices").
func TestRemoveRightAfterUnmount(t *testing.T) {
	parent := harness.ZFSParent(t)
	s := mustOpen(t, parent, t.TempDir())
	ctx := context.Background()
	for i := 0; i < 5; i++ {
		v, err := s.Create(ctx, driver.Spec{Name: "quick", Kind: driver.KindBlock})
		if err != nil {
			t.Fatal(err)
		}
		mp := filepath.Join(t.TempDir(), "m")
		if err := s.Mount(ctx, v, mp); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(mp, "f"), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := s.Unmount(ctx, v, mp); err != nil {
			t.Fatal(err)
		}
		if err := s.Remove(ctx, v); err != nil {
			t.Fatalf("round %d: Remove right after unmount: %v", i, err)
		}
	}
}

// TestCreateGrowsClone: -o size larger than the golden grows the clone's zvol and its XFS.
func TestCreateGrowsClone(t *testing.T) {
	parent, s, g := withGolden(t)
	ctx := context.Background()
	big := uint64(3 << 30)
	v, err := s.Create(ctx, driver.Spec{Name: "big", Kind: driver.KindBlock, Golden: "prj", Size: big})
	if err != nil {
		t.Fatal(err)
	}
	if v.Size != big || v.Generation != g.Number {
		t.Fatalf("grown clone = %+v", v)
	}
	mp := filepath.Join(t.TempDir(), "m")
	if err := s.Mount(ctx, v, mp); err != nil {
		t.Fatal(err)
	}
	defer s.Unmount(ctx, v, mp)
	var st syscall.Statfs_t
	if err := syscall.Statfs(mp, &st); err != nil {
		t.Fatal(err)
	}
	if size := st.Blocks * uint64(st.Bsize); size < 2900<<20 { // the golden's XFS is 1 GiB
		t.Fatalf("XFS was not grown to the 3 GiB zvol: %d bytes", size)
	}
	drivertest.CheckTree(t, mp)
	_, err = s.Create(ctx, driver.Spec{Name: "small", Kind: driver.KindBlock, Golden: "prj", Size: 512 << 20})
	if !errors.Is(err, driver.ErrInvalid) {
		t.Fatalf("a clone smaller than its golden: err = %v, want ErrInvalid", err)
	}
	if slices.Contains(harness.ZFSInventory(t, parent), parent+"/vol/small") {
		t.Fatal("a failed Create left its clone behind")
	}
}

// TestRemoveGenerationKeepsLineageOrigins: a generation that another of the project's lineages
// was cloned from has no volume among its Dependents, but ZFS refuses to destroy it. Reclaim
// must see it as in use (ErrGenerationInUse, which it skips), not fail, and it must survive.
func TestRemoveGenerationKeepsLineageOrigins(t *testing.T) {
	parent, s, g := withGolden(t)
	lineage := parent + "/golden/prj/g999"
	harness.Run(t, "zfs", "clone", g.Source, lineage)
	defer harness.Run(t, "zfs", "destroy", lineage)
	err := s.RemoveGeneration(context.Background(), "prj", g.Number)
	if !errors.Is(err, driver.ErrGenerationInUse) {
		t.Fatalf("RemoveGeneration of %s, the origin of %s: %v; want ErrGenerationInUse", g.Source, lineage, err)
	}
	if !slices.Contains(harness.ZFSInventory(t, parent), g.Source) {
		t.Fatalf("%s was destroyed", g.Source)
	}
}

// withGolden opens a store on a fresh parent dataset and imports the test tree as golden "prj".
func withGolden(t *testing.T) (parent string, s *zfsstore.Store, g driver.Generation) {
	t.Helper()
	parent = harness.ZFSParent(t)
	s = mustOpen(t, parent, t.TempDir())
	src := t.TempDir()
	drivertest.MakeTree(t, src)
	g, err := driver.ImportTree(context.Background(), s, "prj", driver.KindBlock, src, func(driver.Progress) {})
	if err != nil {
		t.Fatal(err)
	}
	return parent, s, g
}

// TestCreatePicksAcrossGoldenChanges: Create remembers a project's generations between calls
// (one zfs process per Create instead of two), so it must still see a generation imported since,
// and survive one destroyed behind the store's back by re-reading the golden.
func TestCreatePicksAcrossGoldenChanges(t *testing.T) {
	parent, s, g1 := withGolden(t)
	ctx := context.Background()
	var createFrom func(name, project string) driver.Volume
	create := func(name string) driver.Volume { t.Helper(); return createFrom(name, "prj") }
	createFrom = func(name, project string) driver.Volume {
		t.Helper()
		v, err := s.Create(ctx, driver.Spec{Name: name, Kind: driver.KindBlock, Golden: project})
		if err != nil {
			t.Fatalf("Create %s: %v", name, err)
		}
		if err := s.Remove(ctx, v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	if v := create("before"); v.Generation != g1.Number {
		t.Fatalf("first Create cloned generation %d; want %d", v.Generation, g1.Number)
	}
	src := t.TempDir()
	drivertest.MakeTree(t, src)
	g2, err := driver.ImportTree(ctx, s, "prj", driver.KindBlock, src, func(driver.Progress) {})
	if err != nil {
		t.Fatal(err)
	}
	if v := create("after-import"); v.Generation != g2.Number {
		t.Fatalf("Create after an import cloned generation %d; want the new %d (a stale pick)", v.Generation, g2.Number)
	}
	harness.ZFSInventory(t, parent)             // waits for the removed volumes' destroys, which pin g2
	harness.Run(t, "zfs", "destroy", g2.Source) // by hand, as an operator might
	if v := create("after-destroy"); v.Generation != g1.Number {
		t.Fatalf("Create after generation %d was destroyed by hand cloned %d; want %d", g2.Number, v.Generation, g1.Number)
	}

	// A second writer, another store on the same parent, imports a golden for a project this
	// store has only seen without one: the next Create clones it instead of cold-starting.
	if v := createFrom("cold", "later"); !v.ColdStart {
		t.Fatalf("Create from a project without a golden: %+v; want a cold start", v)
	}
	other := mustOpen(t, parent, t.TempDir())
	gl, err := driver.ImportTree(ctx, other, "later", driver.KindBlock, src, func(driver.Progress) {})
	if err != nil {
		t.Fatal(err)
	}
	if v := createFrom("warm", "later"); v.ColdStart || v.Generation != gl.Number {
		t.Fatalf("Create after another writer imported golden later: %+v; want a clone of generation %d", v, gl.Number)
	}
	if inv := harness.ZFSInventory(t, parent); slices.ContainsFunc(inv, func(n string) bool { return strings.Contains(n, "/vol/") }) {
		t.Fatalf("volumes left behind: %v", inv)
	}
}

// TestRemoveGoesThroughTrash: Remove renames the volume into PARENT/trash (so it takes the same
// time whatever the volume wrote: see trash.go) and a worker destroys it. The name is free at
// once, the generation is reclaimable at once, and a volume a crash left in the trash is
// destroyed by the next store's Load.
func TestRemoveGoesThroughTrash(t *testing.T) {
	parent, s, g := withGolden(t)
	ctx := context.Background()
	v, err := s.Create(ctx, driver.Spec{Name: "busy", Kind: driver.KindBlock, Golden: "prj"})
	if err != nil {
		t.Fatal(err)
	}
	mp := filepath.Join(t.TempDir(), "m")
	if err := s.Mount(ctx, v, mp); err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 64<<20)
	for i := range data {
		data[i] = byte(i * 7919)
	}
	if err := os.WriteFile(filepath.Join(mp, "written"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := s.Unmount(ctx, v, mp); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(ctx, v); err != nil {
		t.Fatal(err)
	}
	if slices.Contains(harness.ZFSInventory(t, parent), parent+"/vol/busy") {
		t.Fatal("the volume's dataset is still under vol/ after Remove")
	}
	// The name is free at once, and a second Remove of the new volume works the same way.
	v2, err := s.Create(ctx, driver.Spec{Name: "busy", Kind: driver.KindBlock, Golden: "prj"})
	if err != nil {
		t.Fatalf("Create of a just-removed name: %v", err)
	}
	if err := s.Remove(ctx, v2); err != nil {
		t.Fatal(err)
	}
	// The generation no volume uses any more is reclaimable right away, though the worker may
	// not have destroyed the clones yet.
	if err := s.RemoveGeneration(ctx, "prj", g.Number); err != nil {
		t.Fatalf("RemoveGeneration right after its last volume was removed: %v", err)
	}
	if inv := harness.ZFSInventory(t, parent); len(inv) != 3 { // vol, golden, golden/prj
		t.Fatalf("after the removals the parent holds %v; want only the roots and the project", inv)
	}

	// A crash between the rename and the destroy leaves the volume in the trash; the next
	// store's Load destroys it, and Status counts it until then.
	harness.Run(t, "zfs", "create", "-s", "-V", "64M", parent+"/trash/crashed.x")
	s2 := mustOpen(t, parent, t.TempDir())
	if _, err := s2.Load(ctx); err != nil {
		t.Fatal(err)
	}
	if inv := harness.ZFSInventory(t, parent); slices.Contains(inv, parent+"/trash/crashed.x") {
		t.Fatalf("Load left %s in the trash: %v", parent+"/trash/crashed.x", inv)
	}
	// The worker forgets the dataset just after its destroy returns, which a slow guest can
	// show after the dataset is gone: the count must reach 0, not be 0 at once.
	var st driver.Status
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if st, err = s2.Status(ctx); err == nil && st.RemovedPending == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Status 30 s after the trash emptied: %v, %v; want removed_pending 0", st, err)
		}
	}

	// Without its trash (destroyed by hand), Remove destroys in place.
	harness.Run(t, "zfs", "destroy", "-r", parent+"/trash")
	v3, err := s2.Create(ctx, driver.Spec{Name: "notrash", Kind: driver.KindBlock})
	if err != nil {
		t.Fatal(err)
	}
	if err := s2.Remove(ctx, v3); err != nil {
		t.Fatalf("Remove without a trash: %v", err)
	}
	if inv := harness.ZFSInventory(t, parent); slices.Contains(inv, parent+"/vol/notrash") {
		t.Fatalf("Remove without a trash left the volume: %v", inv)
	}
}

// TestUnmountHoldsTheDeviceUntilRemove: Unmount keeps a written volume's XFS mounted (an early
// mount, premount.go), so neither XFS's flush nor the zvol's last close (which waits for a
// transaction group) is on Docker's Unmount; the next Mount binds it back with the data, and
// Remove hands it to the trash, which unmounts it and destroys the volume.
func TestUnmountHoldsTheDeviceUntilRemove(t *testing.T) {
	parent, s, _ := withGolden(t)
	ctx := context.Background()
	v, err := s.Create(ctx, driver.Spec{Name: "held", Kind: driver.KindBlock, Golden: "prj"})
	if err != nil {
		t.Fatal(err)
	}
	mp := filepath.Join(t.TempDir(), "m")
	for round := 0; round < 2; round++ { // a second mount of a held device works the same
		if err := s.Mount(ctx, v, mp); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		if round == 1 { // what round 0 wrote came back with the kept mount
			if b, err := os.ReadFile(filepath.Join(mp, "round")); err != nil || string(b) != "0" {
				t.Fatalf("round 1 reads %q (%v) from what round 0 wrote", b, err)
			}
		}
		if err := os.WriteFile(filepath.Join(mp, "w"), make([]byte, 8<<20), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(mp, "round"), []byte(strconv.Itoa(round)), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := s.Unmount(ctx, v, mp); err != nil {
			t.Fatal(err)
		}
		if m, err := xfsutil.MountedAt(mp); err != nil || m != nil {
			t.Fatalf("round %d: after Unmount %s is still mounted (%v)", round, mp, err)
		}
		if st, err := s.Status(ctx); err != nil || st.KeptMounted != 1 {
			t.Fatalf("round %d: Status after Unmount: %+v, %v; want kept_mounted 1", round, st.ZFSStatus, err)
		}
	}
	ds := parent + "/vol/held"
	// The device is open: ZFS refuses to destroy the volume under the store.
	if out, err := harness.Output("zfs", "destroy", ds); err == nil || !strings.Contains(out, "busy") {
		t.Fatalf("zfs destroy of a volume whose device the store holds: %v %s; want busy", err, out)
	}
	if err := s.Remove(ctx, v); err != nil {
		t.Fatalf("Remove of a volume with a held device: %v", err)
	}
	inv := harness.ZFSInventory(t, parent) // waits for the trash to empty
	for _, name := range inv {
		if strings.Contains(name, "held") {
			t.Fatalf("after Remove the parent still holds %s: %v", name, inv)
		}
	}
	if st, err := s.Status(ctx); err != nil || st.DevicesHeld != 0 || st.KeptMounted != 0 {
		t.Fatalf("Status after Remove: %+v, %v; want devices_held 0 and kept_mounted 0", st.ZFSStatus, err)
	}
}
