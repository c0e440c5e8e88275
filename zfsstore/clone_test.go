package zfsstore

import (
	"context"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/tests/harness"
)

// syncTxgs is the set of transaction groups ds's clone and property sets synced in.
func syncTxgs(t *testing.T, ds string) map[int64]bool {
	t.Helper()
	txgs := map[int64]bool{}
	for _, ev := range harness.SyncEvents(t, ds) {
		if ev.Op == "clone" || ev.Op == "set" {
			txgs[ev.Txg] = true
		}
	}
	return txgs
}

// TestCloneSyncTasks: a Create's clone costs one sync task on a 2.4 module and two before it
// (the fallback), and a spare's one on every release, read from the pool's history rather than from the store's own
// claim; either way the volume has dedup=off and the configured compression, and changing that
// setting reaches the datasets the clones inherit it from.
func TestCloneSyncTasks(t *testing.T) {
	parent, _, s, _ := withSpares(t)
	want := 2
	if oneTaskModule(s.versions.Module) {
		want = 1
	}
	if got := s.cloneSyncTasks(); got != want {
		t.Errorf("cloneSyncTasks on module %s = %d, want %d", s.versions.Module, got, want)
	}
	st, err := s.Status(context.Background())
	if err != nil || st.CloneSyncTasks != want {
		t.Errorf("Status clone_sync_tasks = %v (%v), want %d", st.CloneSyncTasks, err, want)
	}
	// A spare is a bare clone: one sync task on every release.
	s.spares.mu.Lock()
	spare := s.spares.ready["prj"][0].ds
	s.spares.mu.Unlock()
	if txgs := syncTxgs(t, spare); len(txgs) != 1 {
		t.Errorf("spare %s: clone and properties synced in txgs %v, want 1 group", spare, txgs)
	}
	for prop, val := range map[string]string{"dedup": "off", "compression": "lz4"} {
		if got := strings.TrimSpace(harness.Run(t, "zfs", "get", "-H", "-o", "value", prop, spare)); got != val {
			t.Errorf("spare %s %s = %q, want %q", spare, prop, got, val)
		}
	}

	// A Create that finds no spare clones for itself.
	parent2 := harness.ZFSParent(t)
	s2 := openSpares(t, parent2, t.TempDir(), 0)
	importTiny(t, s2, "prj", "golden")
	ctx := context.Background()
	v, err := s2.Create(ctx, driver.Spec{Name: "v", Kind: driver.KindBlock, Golden: "prj"})
	if err != nil {
		t.Fatal(err)
	}
	if txgs := syncTxgs(t, v.Source); len(txgs) != want {
		t.Errorf("Create %s: clone and properties synced in txgs %v, want %d group(s)", v.Source, txgs, want)
	}
	for prop, val := range map[string]string{"dedup": "off", "compression": "lz4", "zgolden:state": "ready", "zgolden:golden": "prj"} {
		if got := strings.TrimSpace(harness.Run(t, "zfs", "get", "-H", "-o", "value", prop, v.Source)); got != val {
			t.Errorf("%s %s = %q, want %q", v.Source, prop, got, val)
		}
	}
	if err := s2.Remove(ctx, v); err != nil {
		t.Fatal(err)
	}

	// A new --compression reaches PARENT/vol and PARENT/spare when the store opens again.
	_ = s.Close(ctx)
	l := logrus.New()
	l.SetLevel(logrus.WarnLevel)
	s3, err := New(ctx, Config{Parent: parent, WorkDir: t.TempDir(), DefaultSize: 1 << 30, Compression: "off", Log: logrus.NewEntry(l)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s3.Close(context.Background()) })
	for _, root := range []string{parent + "/vol", parent + "/spare"} {
		if got := strings.TrimSpace(harness.Run(t, "zfs", "get", "-H", "-o", "value", "compression", root)); got != "off" {
			t.Errorf("%s compression = %q after reopening with compression off", root, got)
		}
	}
}
