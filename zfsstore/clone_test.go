package zfsstore

import (
	"context"
	"strconv"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/internal/fault"
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

// TestCloneSyncTasks: a clone with properties costs one sync task on a 2.4 module and two before
// it (the fallback, which Status reports), and a spare's clone and a Create's clone of a block
// volume one on every release (bare before 2.4), read from the pool's history rather than from
// the store's own claim; either way the volume has dedup=off and the configured compression, and
// changing that setting reaches the datasets the clones inherit it from.
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

	// A Create that finds no spare clones for itself. Before 2.4 its properties follow in the
	// background (bare.go), held here so that the Create's own sync tasks are what is counted.
	parent2 := harness.ZFSParent(t)
	s2 := openHeld(t, parent2)
	importTiny(t, s2, "prj", "golden")
	ctx := context.Background()
	v, err := s2.Create(ctx, driver.Spec{Name: "v", Kind: driver.KindBlock, Golden: "prj"})
	if err != nil {
		t.Fatal(err)
	}
	// One sync task on every release: with its properties in one channel program on 2.4, bare
	// before it (bare.go).
	if txgs := syncTxgs(t, v.Source); len(txgs) != 1 {
		t.Errorf("Create %s: clone and properties synced in txgs %v, want 1 group", v.Source, txgs)
	}
	stored := map[string]string{"dedup": "off", "compression": "lz4", "zgolden:state": "ready", "zgolden:golden": "prj"}
	if want == 2 {
		stored = map[string]string{"dedup": "off", "compression": "lz4", "zgolden:state": "-", "zgolden:golden": "-"}
	}
	for prop, val := range stored {
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

// openHeld opens a store on parent whose background settles of bare volumes wait a minute
// (the settle:waiting pause point), or until the store is closed.
func openHeld(t *testing.T, parent string) *Store {
	t.Helper()
	t.Setenv(fault.PauseEnvVar, "settle:waiting=1m")
	l := logrus.New()
	l.SetLevel(logrus.WarnLevel)
	s, err := New(context.Background(), Config{Parent: parent, WorkDir: t.TempDir(), DefaultSize: 1 << 30, Faults: fault.FromEnv(), Log: logrus.NewEntry(l)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	return s
}

// TestBareVolume: a block volume cloned bare (as Creates do before 2.4; forced here on every
// release) is one sync task on Create's path; it gets its properties stored before a fork or a
// promotion can move its origin, so that it still says which generation it came from
// afterwards; one whose background settle never ran (the store closed first) loads after a
// restart with the golden, generation and creation time its origin and ZFS give, and the
// restarted store then stores its properties in the background.
func TestBareVolume(t *testing.T) {
	parent := harness.ZFSParent(t)
	s := openHeld(t, parent)
	g := importTiny(t, s, "prj", "golden")
	ctx := context.Background()
	if _, err := s.Load(ctx); err != nil {
		t.Fatal(err)
	}
	s.oneTask.Store(false) // a 2.1-2.3 module, as far as Create is concerned
	made := map[string]driver.Volume{}
	for _, name := range []string{"plain", "forked", "promoted"} {
		v, err := s.Create(ctx, driver.Spec{Name: name, Kind: driver.KindBlock, Golden: "prj"})
		if err != nil {
			t.Fatal(err)
		}
		if txgs := syncTxgs(t, v.Source); len(txgs) != 1 {
			t.Errorf("Create %s: synced in txgs %v, want 1 group", name, txgs)
		}
		if got := zprop(t, v.Source, "zgolden:state"); got != "-" {
			t.Errorf("%s was cloned with zgolden:state %q, want none (bare)", v.Source, got)
		}
		made[name] = v
	}
	if st, err := s.Status(ctx); err != nil || st.SettlesPending != 3 {
		t.Errorf("Status settles_pending = %v (%v), want 3 while the settles are held", st.SettlesPending, err)
	}
	if _, err := s.Fork(ctx, made["forked"], "", driver.Spec{Name: "fork", Kind: driver.KindBlock}); err != nil {
		t.Fatal(err)
	}
	gen2, err := s.Promote(ctx, made["promoted"], "", "prj")
	if err != nil {
		t.Fatal(err)
	}
	for _, ds := range []string{made["forked"].Source, made["promoted"].Source, parent + "/vol/fork"} {
		for prop, want := range map[string]string{"zgolden:state": "ready", "zgolden:golden": "prj", "zgolden:generation": strconv.Itoa(g.Number), "zgolden:kind": "block"} {
			if got := zprop(t, ds, prop); got != want {
				t.Errorf("%s %s = %q after the fork and the promotion, want %q", ds, prop, got, want)
			}
		}
	}
	if origin := zprop(t, made["promoted"].Source, "origin"); !strings.HasSuffix(origin, "@gen"+strconv.Itoa(gen2.Number)) {
		t.Errorf("the promoted volume's origin is %q; the test means it to move to generation %d", origin, gen2.Number)
	}
	if got := zprop(t, made["plain"].Source, "zgolden:state"); got != "-" {
		t.Errorf("plain, neither forked nor promoted, got zgolden:state %q while its settle was held", got)
	}

	// The restart, before plain's settle ran: every volume loads with what it was made from.
	_ = s.Close(ctx)
	l := logrus.New()
	l.SetLevel(logrus.WarnLevel)
	s2, err := New(ctx, Config{Parent: parent, WorkDir: t.TempDir(), DefaultSize: 1 << 30, Log: logrus.NewEntry(l)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s2.Close(context.Background()) })
	vols, err := s2.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]driver.Volume{}
	for _, v := range vols {
		got[v.Name] = v
	}
	creation, _ := strconv.ParseInt(zpropP(t, made["plain"].Source, "creation"), 10, 64)
	for _, name := range []string{"plain", "forked", "promoted", "fork"} {
		v, ok := got[name]
		switch {
		case !ok:
			t.Errorf("%s is not loaded after the restart: %v", name, vols)
		case v.Golden != "prj" || v.Generation != g.Number || v.Kind != driver.KindBlock:
			t.Errorf("%s loaded as golden %q generation %d kind %s, want prj %d block", name, v.Golden, v.Generation, v.Kind, g.Number)
		case name == "plain" && v.CreatedAt.Unix() != creation:
			t.Errorf("plain loaded with CreatedAt %v, want its ZFS creation %d", v.CreatedAt, creation)
		}
	}
	waitFor(t, "plain's properties, stored in the background after the restart", func() bool {
		return zprop(t, made["plain"].Source, "zgolden:generation") == strconv.Itoa(g.Number)
	})
	if got := zpropP(t, made["plain"].Source, "zgolden:created"); got != strconv.FormatInt(creation, 10) {
		t.Errorf("plain's stored zgolden:created = %q, want its creation %d", got, creation)
	}
}

func zprop(t *testing.T, ds, prop string) string {
	t.Helper()
	return strings.TrimSpace(harness.Run(t, "zfs", "get", "-H", "-o", "value", prop, ds))
}

func zpropP(t *testing.T, ds, prop string) string {
	t.Helper()
	return strings.TrimSpace(harness.Run(t, "zfs", "get", "-H", "-p", "-o", "value", prop, ds))
}
