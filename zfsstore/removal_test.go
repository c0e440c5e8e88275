package zfsstore

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/tests/harness"
)

// TestRemoveIsRecorded: with a record directory, Remove only records the removal (no zfs
// command: the trash worker is stopped here, and the dataset is still there when Remove has
// returned); the record wins over the dataset at the next Load, which destroys it and deletes
// the record; and a Create of the same name while the old dataset waits moves it out of the way.
func TestRemoveIsRecorded(t *testing.T) {
	parent, records := harness.ZFSParent(t), t.TempDir()
	s := openSpares(t, parent, records, 0)
	importTiny(t, s, "prj", "golden")
	ctx := context.Background()
	v, err := s.Create(ctx, driver.Spec{Name: "v", Kind: driver.KindBlock, Golden: "prj"})
	if err != nil {
		t.Fatal(err)
	}
	mp := filepath.Join(t.TempDir(), "m")
	if err := s.Mount(ctx, v, mp); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(mp, "f"), make([]byte, 16<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := s.Unmount(ctx, v, mp); err != nil {
		t.Fatal(err)
	}
	if err := s.stopTrash(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove(ctx, v); err != nil {
		t.Fatal(err)
	}
	ds := parent + "/vol/v"
	if keys := recordKeys(t, s, removalKey); !slices.Contains(keys, ds) {
		t.Fatalf("no removal record of %s on disk after Remove: %v", ds, keys)
	}
	if inv := harness.ZFSInventory(t, parent, t.TempDir()); !slices.Contains(inv, ds) {
		t.Fatalf("Remove destroyed or moved %s itself (the worker was stopped): %v", ds, inv)
	}
	if st, err := s.Status(ctx); err != nil || st.RemovedPending != 1 {
		t.Errorf("Status removed_pending = %v (%v), want 1", st.RemovedPending, err)
	}
	gs, err := s.Goldens(ctx)
	if err != nil || len(gs) != 1 || len(gs[0].Newest().Dependents) != 0 {
		t.Errorf("Goldens after the Remove: %+v (%v); want no dependents", gs, err)
	}

	// A new volume of the same name while the old dataset waits for the worker.
	v2, err := s.Create(ctx, driver.Spec{Name: "v", Kind: driver.KindBlock, Golden: "prj"})
	if err != nil {
		t.Fatalf("Create of a name whose removal waits: %v", err)
	}
	if keys := recordKeys(t, s, removalKey); slices.Contains(keys, ds) {
		t.Fatalf("the removal record of %s outlived the rename into the trash: a restart would destroy the new volume", ds)
	}
	// A worker whose list of datasets to destroy was taken before that Create must not destroy
	// the new volume under the old one's name.
	if _, err := s.destroyPending(ctx, ds); err != nil {
		t.Fatal(err)
	}
	if ok, err := s.zfs.Exists(ctx, ds); !ok || err != nil {
		t.Fatalf("a stale destroy of the removed volume's name destroyed the new volume %s (exists %v, %v)", ds, ok, err)
	}
	if err := s.Remove(ctx, v2); err != nil {
		t.Fatal(err)
	}

	// A restart: the record wins over vol/v's properties, and the new store destroys it.
	_ = s.Close(ctx)
	s2 := openSpares(t, parent, records, 0)
	vols, err := s2.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(vols) != 0 {
		t.Errorf("Load listed %+v; a recorded removal is no volume", vols)
	}
	for _, name := range harness.ZFSInventory(t, parent, records) {
		if strings.HasPrefix(name, parent+"/vol/") || strings.HasPrefix(name, parent+"/trash/") {
			t.Errorf("after the restart %s is left (inventory %v)", name, harness.ZFSInventory(t, parent, records))
		}
	}
	if left := recordKeys(t, s2, removalKey); len(left) != 0 {
		t.Errorf("removal records left after the destroys: %v", left)
	}
}

// TestRemoveDuringRename: a Remove of a claimed spare while the finisher renames it (paused in
// the rename, as a busy pool holds it for transaction groups) returns without waiting for it,
// recording the spare and where it is going; a Create of the same name waits until the rename
// is handed over and then gets a new volume; the old one is destroyed and no record is left.
func TestRemoveDuringRename(t *testing.T) {
	parent, records, s := pausedSpares(t, "claim:renaming=20s", 1)
	ctx := context.Background()
	waitFor(t, "a spare", func() bool { return s.sparesReady()["prj"] == 1 })
	v, err := s.Create(ctx, driver.Spec{Name: "v", Kind: driver.KindBlock, Golden: "prj"})
	if err != nil {
		t.Fatal(err)
	}
	c := s.claimOf("v")
	if c == nil {
		t.Fatal("the Create did not claim the ready spare")
	}
	spareDS := c.Dataset
	renaming := func() bool { c.rm.Lock(); defer c.rm.Unlock(); return c.renaming }
	waitFor(t, "the finisher to start renaming", renaming)
	if err := s.Remove(ctx, v); err != nil {
		t.Fatal(err)
	}
	if !renaming() {
		t.Fatal("Remove returned only after the rename: it waited for the finisher's sync tasks")
	}
	rf, err := s.recordFile()
	if err != nil {
		t.Fatal(err)
	}
	data, ok := rf.Get(removalKey + spareDS)
	if !ok || !slices.Contains(recordKeys(t, s, removalKey), spareDS) {
		t.Fatalf("no removal record naming the spare %s on disk", spareDS)
	}
	var rec removalRecord
	if err := json.Unmarshal(data, &rec); err != nil || rec.Then != parent+"/vol/v" {
		t.Fatalf("removal record %s = %+v (%v); want Then = %s/vol/v", data, rec, err, parent)
	}

	// A Create of the name waits for the hand-over, then makes a new volume.
	if _, err := s.Create(ctx, driver.Spec{Name: "v", Kind: driver.KindBlock, Golden: "prj"}); err != nil {
		t.Fatalf("Create of the removed name after the rename: %v", err)
	}
	if renaming() {
		t.Error("the Create of the name returned while the old volume's rename was still under way")
	}
	waitFor(t, "the trash and the claims to settle", func() bool {
		st, err := s.Status(ctx)
		return err == nil && st.RemovedPending == 0 && st.ClaimsPending == 0
	})
	if ok, err := s.zfs.Exists(ctx, spareDS); ok || err != nil {
		t.Errorf("the removed volume's spare %s is still there (%v)", spareDS, err)
	}
	if left := recordKeys(t, s, removalKey); len(left) != 0 {
		t.Errorf("removal records left: %v", left)
	}
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	vols, err := openSpares(t, parent, records, 0).Load(ctx)
	if err != nil || len(vols) != 1 || vols[0].Name != "v" {
		t.Errorf("a restart lists %+v (%v); want the new volume v alone", vols, err)
	}
}

// TestLoadFinishesRemovalAfterRename: a crash after the rename of a spare whose volume was
// removed meanwhile, before the finisher re-recorded it, leaves a record naming the gone spare
// and PARENT/vol/NAME after it; Load treats vol/NAME as the removed volume and destroys it.
func TestLoadFinishesRemovalAfterRename(t *testing.T) {
	parent, records := harness.ZFSParent(t), t.TempDir()
	s := openSpares(t, parent, records, 0)
	importTiny(t, s, "prj", "golden")
	ctx := context.Background()
	if _, err := s.Create(ctx, driver.Spec{Name: "w", Kind: driver.KindBlock, Golden: "prj"}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	gone := parent + "/spare/renamed"
	if err := s.writeRemoval(removalRecord{Name: "w", Dataset: gone, Then: parent + "/vol/w", Removed: 1}); err != nil {
		t.Fatal(err)
	}
	_ = s.closeRecords()
	s2 := openSpares(t, parent, records, 0)
	vols, err := s2.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(vols) != 0 {
		t.Errorf("Load listed %+v; vol/w is the removed volume", vols)
	}
	waitFor(t, "the destroy", func() bool {
		ok, err := s2.zfs.Exists(ctx, parent+"/vol/w")
		return err == nil && !ok
	})
	waitFor(t, "the records to go", func() bool {
		return len(recordKeys(t, s2, removalKey)) == 0
	})
}
