package zfsstore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/internal/fault"
	"github.com/zgolden/zgolden/internal/recordfile"
	"github.com/zgolden/zgolden/tests/harness"
	"github.com/zgolden/zgolden/xfsutil"
)

func openSpares(t *testing.T, parent, records string, spares int) *Store {
	t.Helper()
	l := logrus.New()
	l.SetLevel(logrus.WarnLevel)
	// One work directory per parent, as a restarted plugin keeps its state directory: the early
	// mounts of spares live there (premount.go).
	work := filepath.Join(os.TempDir(), "zgolden-work-"+strings.ReplaceAll(parent, "/", "_"))
	t.Cleanup(func() { _ = os.RemoveAll(work) })
	s, err := New(context.Background(), Config{Parent: parent, WorkDir: work, DefaultSize: 1 << 30, Log: logrus.NewEntry(l), Spares: spares, RecordDir: records})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	return s
}

// pausedSpares opens and loads a store with spares spares of golden prj and the pause point
// pause (fault.PauseEnvVar), for steps that a slow pool makes likely.
func pausedSpares(t *testing.T, pause string, spares int) (parent, records string, s *Store) {
	t.Helper()
	t.Setenv(fault.PauseEnvVar, pause)
	parent, records = harness.ZFSParent(t), t.TempDir()
	l := logrus.New()
	l.SetLevel(logrus.WarnLevel)
	s, err := New(context.Background(), Config{Parent: parent, WorkDir: t.TempDir(), DefaultSize: 1 << 30,
		Log: logrus.NewEntry(l), Spares: spares, RecordDir: records, Faults: fault.FromEnv()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	importTiny(t, s, "prj", "golden")
	if _, err := s.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	return parent, records, s
}

func importTiny(t *testing.T, s *Store, project, content string) driver.Generation {
	t.Helper()
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "f"), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	g, err := driver.ImportTree(context.Background(), s, project, driver.KindBlock, src, func(driver.Progress) {})
	if err != nil {
		t.Fatal(err)
	}
	return g
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(2 * time.Minute); !cond(); time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// withSpares opens a store with Spares 2 on a new parent, imports project prj, loads, and waits
// until both spares are ready.
func withSpares(t *testing.T) (parent, records string, s *Store, g driver.Generation) {
	t.Helper()
	parent, records = harness.ZFSParent(t), t.TempDir()
	s = openSpares(t, parent, records, 2)
	g = importTiny(t, s, "prj", "golden")
	if _, err := s.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "two spares", func() bool { return s.sparesReady()["prj"] == 2 })
	return parent, records, s, g
}

// spareGenerations lists the generation of every dataset under PARENT/spare, read from its
// origin (PARENT/golden/PROJECT/gK@genN) as the store does.
func spareGenerations(t *testing.T, parent string) []string {
	t.Helper()
	out := harness.Run(t, "zfs", "list", "-H", "-r", "-t", "volume", "-o", "origin", parent+"/spare")
	var gens []string
	for _, origin := range strings.Fields(out) {
		_, snap, _ := strings.Cut(origin, "@")
		gens = append(gens, strings.TrimPrefix(snap, genPrefix))
	}
	return gens
}

// TestSpareOrigin: a spare's project and generation come from its origin, and an origin that is
// no generation snapshot under the store's own golden root names none.
func TestSpareOrigin(t *testing.T) {
	s := &Store{cfg: Config{Parent: "tank/zg"}}
	for origin, want := range map[string]string{
		"tank/zg/golden/prj/g1@gen3":    "prj 3",
		"tank/zg/golden/p_2/g12@gen12":  "p_2 12",
		"tank/zg/golden/prj/g1@fork-x":  "",
		"tank/zg/golden/prj/g1@gen0":    "",
		"tank/zg/golden/prj/g1@genx":    "",
		"tank/zg/golden/prj/x1@gen3":    "",
		"tank/zg/golden/prj/g1/y@gen3":  "",
		"tank/zg/golden/prj@gen3":       "",
		"tank/zg/vol/a@gen3":            "",
		"tank/other/golden/prj/g1@gen3": "",
		"tank/zg/golden/../g1@gen3":     "",
		"-":                             "",
	} {
		got := ""
		if p, g, ok := s.originGeneration(origin); ok {
			got = fmt.Sprintf("%s %d", p, g)
		}
		if got != want {
			t.Errorf("originGeneration(%q) = %q, want %q", origin, got, want)
		}
	}
}

// TestSparesAreClaimedAndFinished: with Spares 2 the worker keeps two clones of the newest
// generation; a Create takes one (no zfs command on its path), the finisher gives it its name in
// the background while it is mounted, the data stays, the spares are made again, a promotion
// retires the old generation's spares, and golden rm leaves nothing.
func TestSparesAreClaimedAndFinished(t *testing.T) {
	parent, _, s, g := withSpares(t)
	ctx := context.Background()

	v, err := s.Create(ctx, driver.Spec{Name: "a", Kind: driver.KindBlock, Golden: "prj"})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(v.Source, parent+"/spare/") || v.Generation != g.Number || v.Golden != "prj" {
		t.Fatalf("Create did not claim a spare: %+v", v)
	}
	mp := filepath.Join(t.TempDir(), "m")
	if err := s.Mount(ctx, v, mp); err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(filepath.Join(mp, "f")); err != nil || string(got) != "golden" {
		t.Fatalf("the claimed spare does not hold the golden: %q, %v", got, err)
	}
	if err := os.WriteFile(filepath.Join(mp, "mine"), []byte("session"), 0o644); err != nil {
		t.Fatal(err)
	}
	ds := parent + "/vol/a"
	waitFor(t, "the claimed spare's rename", func() bool { ok, _ := s.zfs.Exists(ctx, ds); return ok && s.claimsPending() == 0 })
	for prop, want := range map[string]string{"zgolden:kind": "block", "zgolden:golden": "prj", "zgolden:generation": strconv.Itoa(g.Number), "zgolden:state": "ready", "zgolden:created": strconv.FormatInt(v.CreatedAt.Unix(), 10), "dedup": "off"} {
		if got := strings.TrimSpace(harness.Run(t, "zfs", "get", "-H", "-p", "-o", "value", prop, ds)); got != want {
			t.Errorf("%s of the finished volume is %q, want %q", prop, got, want)
		}
	}
	if keys := recordKeys(t, s, claimKey); slices.Contains(keys, "a") {
		t.Fatalf("the claim record outlived the rename: %v", keys)
	}
	if err := os.WriteFile(filepath.Join(mp, "after"), []byte("rename"), 0o644); err != nil {
		t.Fatalf("writing to the volume after its rename: %v", err)
	}
	if err := s.Unmount(ctx, v, mp); err != nil {
		t.Fatal(err)
	}
	if err := s.Mount(ctx, v, mp); err != nil {
		t.Fatalf("mount after the rename: %v", err)
	}
	for f, want := range map[string]string{"mine": "session", "after": "rename"} {
		if got, err := os.ReadFile(filepath.Join(mp, f)); err != nil || string(got) != want {
			t.Fatalf("%s after remount: %q, %v", f, got, err)
		}
	}
	if err := s.Unmount(ctx, v, mp); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the spares to be made again", func() bool { return s.sparesReady()["prj"] == 2 })

	// A promotion of a volume that is still a claimed spare finishes the claim first.
	b, err := s.Create(ctx, driver.Spec{Name: "b", Kind: driver.KindBlock, Golden: "prj"})
	if err != nil {
		t.Fatal(err)
	}
	g2, err := s.Promote(ctx, b, "", "prj")
	if err != nil {
		t.Fatalf("Promote of a claimed spare: %v", err)
	}
	s.kickSpares()
	waitFor(t, "spares of the new generation only", func() bool {
		gens := spareGenerations(t, parent)
		return len(gens) == 2 && gens[0] == strconv.Itoa(g2.Number) && gens[1] == strconv.Itoa(g2.Number)
	})
	for _, vol := range []driver.Volume{v, b} {
		if err := s.Remove(ctx, vol); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.RemoveGolden(ctx, "prj"); err != nil {
		t.Fatalf("RemoveGolden with spares made: %v", err)
	}
	if gens := spareGenerations(t, parent); len(gens) != 0 {
		t.Fatalf("RemoveGolden left spares of generations %v", gens)
	}
}

// TestClaimSurvivesACrash: a claim is durable once Create returns. A store that died before the
// rename leaves the record and the spare, and the next store's Load returns the volume and
// finishes the rename; a spare whose record never reached the disk (the Create never returned)
// is a spare again.
func TestClaimSurvivesACrash(t *testing.T) {
	parent, records, s, g := withSpares(t)
	ctx := context.Background()
	// Stop the worker, as a crash would, so nothing renames the claims below.
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	kept, err := s.Create(ctx, driver.Spec{Name: "kept", Kind: driver.KindBlock, Golden: "prj"})
	if err != nil || !strings.HasPrefix(kept.Source, parent+"/spare/") {
		t.Fatalf("claim: %+v, %v", kept, err)
	}
	lost, err := s.Create(ctx, driver.Spec{Name: "lost", Kind: driver.KindBlock, Golden: "prj"})
	if err != nil || !strings.HasPrefix(lost.Source, parent+"/spare/") {
		t.Fatalf("claim: %+v, %v", lost, err)
	}
	if err := s.deleteRecord("lost"); err != nil { // as if it never reached the disk
		t.Fatal(err)
	}

	s2 := openSpares(t, parent, records, 0) // Spares 0: claims are honoured all the same
	vols, err := s2.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(vols) != 1 || vols[0].Name != "kept" || vols[0].Source != kept.Source || vols[0].Generation != g.Number {
		t.Fatalf("Load after the crash returned %+v; want only the claimed volume kept on %s", vols, kept.Source)
	}
	waitFor(t, "the rename of the recorded claim", func() bool { ok, _ := s2.zfs.Exists(ctx, parent+"/vol/kept"); return ok && s2.claimsPending() == 0 })
	// The spare whose claim was never recorded is a spare again, and with Spares 0 it is retired.
	waitFor(t, "the unclaimed spares to be retired", func() bool { return len(spareGenerations(t, parent)) == 0 })
	mp := filepath.Join(t.TempDir(), "m")
	v, err := s2.Create(ctx, driver.Spec{Name: "x", Kind: driver.KindBlock, Golden: "prj"})
	if err != nil || strings.HasPrefix(v.Source, parent+"/spare/") {
		t.Fatalf("with Spares 0 a Create clones: %+v, %v", v, err)
	}
	if err := s2.Mount(ctx, vols[0], mp); err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(filepath.Join(mp, "f")); err != nil || string(got) != "golden" {
		t.Fatalf("the recovered volume: %q, %v", got, err)
	}
	if err := s2.Unmount(ctx, vols[0], mp); err != nil {
		t.Fatal(err)
	}
	for _, vol := range []driver.Volume{vols[0], v} {
		if err := s2.Remove(ctx, vol); err != nil {
			t.Fatal(err)
		}
	}
	if err := s2.RemoveGolden(ctx, "prj"); err != nil {
		t.Fatal(err)
	}
	// Claims in the record directory, removals under its removing/ (removal.go): none left.
	if left := recordKeys(t, s2, ""); len(left) != 0 {
		t.Fatalf("records left: %v", left)
	}
}

// TestSparePicksStayFresh: with spares ready, the worker reads a project's pick again before it
// expires, so the Create that claims a spare finds it in memory even after a quiet spell longer
// than pickMaxAge (without the refresh its Create would run a zfs list, which on a busy pool is
// most of what is left of it).
func TestSparePicksStayFresh(t *testing.T) {
	_, _, s, g := withSpares(t)
	time.Sleep(pickMaxAge + 2*time.Second)
	got, _, cached, err := s.pickGeneration(context.Background(), driver.Spec{Golden: "prj", Kind: driver.KindBlock}, false)
	if err != nil || got == nil || got.Number != g.Number {
		t.Fatalf("pick after a quiet spell: %+v, %v", got, err)
	}
	if !cached {
		t.Errorf("after %s with spares ready, the pick of prj was read from ZFS again on the Create's path", pickMaxAge+2*time.Second)
	}
}

// TestSparesAreMountedAhead: the worker mounts each ready spare's XFS ahead of its claim; the
// claiming volume's Mount binds that mount (the golden's data is there) and leaves it, so that
// Unmount only unmounts Docker's mountpoint and the next Mount binds it again; a volume without
// an early mount (one that a stop's Close took) gets a kept one at Unmount; Close unmounts them
// all.
func TestSparesAreMountedAhead(t *testing.T) {
	_, _, s, _ := withSpares(t)
	ctx := context.Background()
	waitFor(t, "two early mounts", func() bool { pm, err := s.premounts(); return err == nil && len(pm) == 2 })
	v, err := s.Create(ctx, driver.Spec{Name: "early", Kind: driver.KindBlock, Golden: "prj"})
	if err != nil {
		t.Fatal(err)
	}
	ds := s.dsOf("early")
	pm := s.premountOf(ds)
	if pm == "" {
		t.Fatalf("the claimed spare %s has no early mount", ds)
	}
	// premountOf starts from a hint of where the early mount was last seen, and of the device
	// then mounted there. A stale one, a path now on another device (another dataset's early
	// mount) or with nothing there, is checked and the scan finds the truth.
	var st unix.Stat_t
	if err := unix.Stat(pm, &st); err != nil {
		t.Fatal(err)
	}
	all, err := s.premounts()
	if err != nil {
		t.Fatal(err)
	}
	checked := false
	for other, opm := range all {
		if other != ds {
			checked = true
			for _, wrong := range []string{opm, filepath.Join(s.premountDir(), "nothing")} {
				s.pmHints.Lock()
				s.pmHints.m[ds] = earlyMount{path: wrong, dev: st.Dev}
				s.pmHints.Unlock()
				if got := s.premountOf(ds); got != pm {
					t.Errorf("with the stale hint %s, premountOf(%s) = %q; want %s", wrong, ds, got, pm)
				}
			}
			break
		}
	}
	if !checked {
		t.Errorf("no other early mount to give premountOf a stale hint: %v", all)
	}
	target := filepath.Join(t.TempDir(), "m")
	for round := 1; round <= 2; round++ {
		if err := s.Mount(ctx, v, target); err != nil {
			t.Fatal(err)
		}
		if data, err := os.ReadFile(filepath.Join(target, "f")); err != nil || string(data) != "golden" {
			t.Errorf("round %d: the early-mounted volume holds %q (%v); want the golden's file", round, data, err)
		}
		if got := s.premountOf(s.dsOf("early")); got != pm {
			t.Errorf("round %d: after Mount the volume's early mount is %q, want %s kept beside Docker's", round, got, pm)
		}
		want := fmt.Sprintf("session %d", round)
		if err := os.WriteFile(filepath.Join(target, "w"), []byte(want), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := s.Unmount(ctx, v, target); err != nil {
			t.Fatal(err)
		}
		if m, _ := xfsutil.MountedAt(target); m != nil {
			t.Fatalf("round %d: Unmount left %s mounted", round, target)
		}
		// The early mount still holds the XFS, with what was written through Docker's mount.
		if data, err := os.ReadFile(filepath.Join(pm, "w")); err != nil || string(data) != want {
			t.Errorf("round %d: after Unmount the early mount %s holds %q (%v), want %q", round, pm, data, err, want)
		}
		if kept := keptMounts(t, s); len(kept) > 0 {
			t.Errorf("round %d: Unmount made a kept mount %v where the volume had an early mount", round, kept)
		}
	}

	// A volume whose early mount is gone (Close unmounts them; Docker's mount stays): its
	// Unmount binds a kept one, so unmounting Docker's mountpoint still writes nothing.
	v2, err := s.Create(ctx, driver.Spec{Name: "early2", Kind: driver.KindBlock, Golden: "prj"})
	if err != nil {
		t.Fatal(err)
	}
	target2 := filepath.Join(t.TempDir(), "m2")
	if err := s.Mount(ctx, v2, target2); err != nil {
		t.Fatal(err)
	}
	pm2 := s.premountOf(s.dsOf("early2"))
	if pm2 == "" {
		t.Fatal("the second claimed volume has no early mount")
	}
	harness.Run(t, "umount", pm2)
	if err := s.Unmount(ctx, v2, target2); err != nil {
		t.Fatal(err)
	}
	kept := s.premountOf(s.dsOf("early2"))
	if !strings.HasPrefix(filepath.Base(kept), keptPrefix) { // u-NAME, or u-ID before the finisher's rename
		t.Fatalf("after Unmount of a volume without an early mount, its early mount is %q; want a kept one, %s...", kept, keptPrefix)
	}
	if _, err := os.Stat(filepath.Join(kept, "f")); err != nil {
		t.Errorf("the kept mount lost the volume's data: %v", err)
	}
	for _, v := range []driver.Volume{v, v2} {
		if err := s.Remove(ctx, v); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if left, err := xfsutil.MountsUnder(s.premountDir()); err != nil || len(left) != 0 {
		t.Errorf("Close left early mounts %+v (%v)", left, err)
	}
}

// keptMounts lists the kept mounts under WORKDIR/spares.
func keptMounts(t *testing.T, s *Store) []string {
	t.Helper()
	ms, err := xfsutil.MountsUnder(s.premountDir())
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, m := range ms {
		if strings.HasPrefix(filepath.Base(m.Mountpoint), keptPrefix) {
			out = append(out, m.Mountpoint)
		}
	}
	return out
}

// TestNameReusedWhileRemovedWaitsInTrash: a removed volume's kept mount stays in the trash until
// its destroy, and a new volume of the same name must never be given it. The trash worker is
// held off (the test holds trash.run, which each emptying takes, so no destroy and none of its
// scans of the early mounts happens) while the volume is removed and a volume of the same name
// is made, mounted, written, unmounted and mounted again: each mount must show its own data, and
// the two kept mounts must be two. Then the worker destroys the first, and nothing is left.
// With a record directory, Remove records the removal and the new volume's Create moves the old
// dataset into the trash (clearRemoval); without one, Remove renames it there (trashVolume).
func TestNameReusedWhileRemovedWaitsInTrash(t *testing.T) {
	t.Run("recorded", func(t *testing.T) { nameReusedWhileRemoved(t, t.TempDir()) })
	t.Run("renamed", func(t *testing.T) { nameReusedWhileRemoved(t, "") })
}

func nameReusedWhileRemoved(t *testing.T, records string) {
	parent := harness.ZFSParent(t)
	s := openSpares(t, parent, records, 0)
	importTiny(t, s, "prj", "golden")
	if _, err := s.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	target := filepath.Join(t.TempDir(), "m")
	session := func(want string) (driver.Volume, string) {
		t.Helper()
		v, err := s.Create(ctx, driver.Spec{Name: "reused", Kind: driver.KindBlock, Golden: "prj"})
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Mount(ctx, v, target); err != nil {
			t.Fatal(err)
		}
		if data, err := os.ReadFile(filepath.Join(target, "session")); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("a new volume %q mounted with a session file there already, %q (%v): it was given a removed volume's XFS", v.Name, data, err)
		}
		if err := os.WriteFile(filepath.Join(target, "session"), []byte(want), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := s.Unmount(ctx, v, target); err != nil {
			t.Fatal(err)
		}
		pm := s.premountOf(s.dsOf(v.Name))
		if data, err := os.ReadFile(filepath.Join(pm, "session")); err != nil || string(data) != want {
			t.Fatalf("after Unmount, the early mount %q of %s holds %q (%v); want %q", pm, v.Name, data, err, want)
		}
		return v, pm
	}
	v, first := session("first")
	s.trash.run.Lock()
	held := true
	defer func() {
		if held {
			s.trash.run.Unlock()
		}
	}()
	if err := s.Remove(ctx, v); err != nil {
		t.Fatal(err)
	}
	v, second := session("second")
	if second == first {
		t.Errorf("the new volume's kept mount is the removed one's, %s", first)
	}
	if data, err := os.ReadFile(filepath.Join(first, "session")); err != nil || string(data) != "first" {
		t.Errorf("the removed volume's kept mount %s now holds %q (%v); want its own %q", first, data, err, "first")
	}
	if err := s.Mount(ctx, v, target); err != nil {
		t.Fatal(err)
	}
	if data, err := os.ReadFile(filepath.Join(target, "session")); err != nil || string(data) != "second" {
		t.Errorf("mounted again, the new volume holds %q (%v); want %q", data, err, "second")
	}
	if err := s.Unmount(ctx, v, target); err != nil {
		t.Fatal(err)
	}
	held = false
	s.trash.run.Unlock()
	s.kickTrash()
	waitFor(t, "the trash to empty", func() bool { return s.trashPending() == 0 })
	if data, err := os.ReadFile(filepath.Join(s.premountOf(s.dsOf(v.Name)), "session")); err != nil || string(data) != "second" {
		t.Errorf("after the removed volume's destroy, the new volume's early mount holds %q (%v); want %q", data, err, "second")
	}
	if err := s.Remove(ctx, v); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the trash to empty", func() bool { return s.trashPending() == 0 })
	if kept := keptMounts(t, s); len(kept) > 0 {
		t.Errorf("after both volumes were destroyed, kept mounts are left: %v", kept)
	}
}

// recordKeys lists, from the record file on disk, the keys of one kind (claimKey, removalKey, or
// "" for all) without their prefix.
func recordKeys(t *testing.T, s *Store, kind string) []string {
	t.Helper()
	keys, err := recordfile.ReadKeys(RecordFile(s.cfg.RecordDir, s.cfg.Parent))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, k := range keys {
		if rest, ok := strings.CutPrefix(k, kind); ok {
			out = append(out, rest)
		}
	}
	return out
}

// TestCreateWaitsForASpareBeingMade: the worker makes spares side by side, and starts a
// replacement as soon as one is claimed. A Create that finds no spare ready, while the worker
// makes one of its generation (held in spare:making, as a busy pool holds its clone), waits for
// that spare and claims it rather than cloning. One whose deadline comes first fails, saying it
// waited, and leaves nothing: the spare goes to the ready ones. One whose spare cannot be made
// (the worker stops) clones after all.
func TestCreateWaitsForASpareBeingMade(t *testing.T) {
	parent, _, s := pausedSpares(t, "spare:making=6s", 2)
	ctx := context.Background()
	making := func(n int) func() bool { return func() bool { m, _ := s.awaited("prj"); return m == n } }
	stocked := func() bool { m, _ := s.awaited("prj"); return m == 0 && s.sparesReady()["prj"] == 2 }
	waitFor(t, "two spares in the making at once", making(2))
	waitFor(t, "two spares ready", stocked)
	var vols []driver.Volume
	create := func(ctx context.Context, name string) (driver.Volume, error) {
		v, err := s.Create(ctx, driver.Spec{Name: name, Kind: driver.KindBlock, Golden: "prj"})
		if err == nil {
			vols = append(vols, v)
		}
		return v, err
	}
	claim := func(name, why string) driver.Volume {
		t.Helper()
		v, err := create(ctx, name)
		if err != nil || !strings.HasPrefix(v.Source, parent+"/spare/") {
			t.Fatalf("%s %s: %+v, %v", name, why, v, err)
		}
		return v
	}
	claim("a", "did not claim a ready spare")
	claim("b", "did not claim a ready spare")
	waitFor(t, "both replacements in the making at once", making(2))
	claim("c", "with spares in the making, did not wait for one")
	waitFor(t, "two spares ready", stocked)

	claim("e", "did not claim a ready spare")
	claim("f", "did not claim a ready spare")
	waitFor(t, "both replacements in the making at once", making(2))
	short, cancel := context.WithTimeout(ctx, rollbackReserve+time.Second)
	defer cancel()
	_, err := create(short, "late")
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "for a spare of prj") {
		t.Fatalf("a Create out of time while it waited: %v", err)
	}
	if ok, _ := s.zfs.Exists(ctx, parent+"/vol/late"); ok {
		t.Fatal("the Create that ran out of time left its dataset")
	}
	waitFor(t, "the spare the late Create gave up on, and the next, to be ready", stocked)

	claim("g", "did not claim a ready spare")
	claim("h", "did not claim a ready spare")
	waitFor(t, "both replacements in the making at once", making(2))
	type result struct {
		v   driver.Volume
		err error
	}
	got := make(chan result, 1)
	go func() {
		v, err := s.Create(ctx, driver.Spec{Name: "d", Kind: driver.KindBlock, Golden: "prj"})
		got <- result{v, err}
	}()
	waitFor(t, "d to wait for a spare", func() bool { _, w := s.awaited("prj"); return w == 1 })
	if err := s.stopWorker(ctx); err != nil {
		t.Fatal(err)
	}
	d := <-got
	if d.err != nil || d.v.Source != parent+"/vol/d" {
		t.Fatalf("d, whose spare was never made, did not clone: %+v, %v", d.v, d.err)
	}
	for _, v := range append(vols, d.v) {
		if err := s.Remove(ctx, v); err != nil {
			t.Fatal(err)
		}
	}
}

// TestStraySpareIsAdopted: a spare under PARENT/spare that the store does not know (the clone of
// a spare whose making a crash interrupted, landing after the next start's Load) is adopted at the
// worker's next pass, and, being too many, retired: no dataset under PARENT/spare is left that no
// count knows of. One stray is bare, as the worker clones them; the other carries the zgolden:*
// properties that spares had before, with a generation that its origin contradicts (the origin
// wins).
func TestStraySpareIsAdopted(t *testing.T) {
	parent, _, s, g := withSpares(t)
	harness.Run(t, "zfs", "clone", g.Source, parent+"/spare/stray1")
	harness.Run(t, "zfs", "clone", "-o", "zgolden:kind=block", "-o", "zgolden:golden=prj",
		"-o", "zgolden:generation="+strconv.Itoa(g.Number+7), "-o", "zgolden:state=ready", g.Source, parent+"/spare/stray2")
	s.kickSpares()
	waitFor(t, "the stray spares to be adopted, and the spares too many retired", func() bool {
		return len(spareGenerations(t, parent)) == 2 && s.sparesReady()["prj"] == 2
	})
	if gens := spareGenerations(t, parent); gens[0] != strconv.Itoa(g.Number) || gens[1] != gens[0] {
		t.Errorf("spares of generations %v, want two of %d", gens, g.Number)
	}
	s.spares.mu.Lock()
	for _, sp := range s.spares.ready["prj"] {
		if sp.gen != g.Number {
			t.Errorf("spare %s counted as generation %d, want %d (its origin's)", sp.ds, sp.gen, g.Number)
		}
	}
	s.spares.mu.Unlock()
}
