package zfsstore

import (
	"context"
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
	if _, err := os.Stat(s.removalFile(ds)); err != nil {
		t.Fatalf("no removal record after Remove: %v", err)
	}
	if inv := harness.ZFSInventory(t, parent, t.TempDir()); !slices.Contains(inv, ds) {
		t.Fatalf("Remove destroyed or moved %s itself (the worker was stopped): %v", ds, inv)
	}
	if st, err := s.Status(ctx); err != nil || st["removed_pending"] != 1 {
		t.Errorf("Status removed_pending = %v (%v), want 1", st["removed_pending"], err)
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
	if _, err := os.Stat(s.removalFile(ds)); !os.IsNotExist(err) {
		t.Fatalf("the removal record of %s outlived the rename into the trash (%v): a restart would destroy the new volume", ds, err)
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
	if left, _ := filepath.Glob(filepath.Join(s2.removalDir(), "*")); len(left) != 0 {
		t.Errorf("removal records left after the destroys: %v", left)
	}
}
