package zfsstore

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/internal/command"
	"github.com/zgolden/zgolden/tests/harness"
)

func openInternal(t *testing.T) (*Store, string) {
	t.Helper()
	parent := harness.ZFSParent(t)
	l := logrus.New()
	l.SetLevel(logrus.WarnLevel)
	s, err := New(context.Background(), Config{Parent: parent, WorkDir: t.TempDir(), DefaultSize: 1 << 30, Log: logrus.NewEntry(l)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	return s, parent
}

// abandoned returns the error of a command that outlived its context and has not exited: a
// shell killed once it has started a child that keeps its output open for four seconds, which
// is what a zfs clone stuck in txg_wait_synced looks like to internal/command.
func abandoned(t *testing.T) error {
	t.Helper()
	old := command.KillGrace
	command.KillGrace = 100 * time.Millisecond
	defer func() { command.KillGrace = old }()
	// The context ends once the shell has started its child, however long that takes in a
	// loaded guest (a fixed second is internal/command's old flake).
	mark := filepath.Join(t.TempDir(), "started")
	ctx, cancel := untilMarked(mark)
	defer cancel()
	_, err := command.Run(ctx, "sh", "-c", `sleep 4 & : > "$1"; wait`, "sh", mark)
	if !errors.Is(err, command.ErrAbandoned) {
		t.Fatalf("could not make an abandoned command: %v", err)
	}
	return err
}

// untilMarked returns a context that ends once the file mark exists (or after a minute): the
// moment a stand-in command has reached the state a test wants it abandoned in.
func untilMarked(mark string) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			if _, err := os.Stat(mark); err == nil {
				break
			}
		}
		cancel()
	}()
	return ctx, cancel
}

// TestLateCloneIsDestroyedAndItsNameRefused: when the clone of a Create outlives its deadline,
// ZFS may still make it. Until the command has exited and what it made is destroyed, a Create of
// that name is refused as busy; afterwards the dataset is gone and the name is free.
func TestLateCloneIsDestroyedAndItsNameRefused(t *testing.T) {
	s, parent := openInternal(t)
	ds := parent + "/vol/late"
	harness.Run(t, "zfs", "create", "-s", "-V", "64M", "-o", "zgolden:state=ready", ds) // the clone that landed late
	err := abandoned(t)
	if !s.cleanupLate("late", ds, err, s.log) {
		t.Fatal("cleanupLate did not take over an abandoned command")
	}
	ctx := context.Background()
	_, cerr := s.Create(ctx, driver.Spec{Name: "late", Kind: driver.KindBlock})
	if !errors.Is(cerr, driver.ErrBusy) || !strings.Contains(cerr.Error(), "retry") {
		t.Fatalf("Create of a name whose late clone is not cleaned up yet: got %v, want busy with a retry hint", cerr)
	}
	deadline := time.Now().Add(time.Minute)
	for s.tomb.has("late") {
		if time.Now().After(deadline) {
			t.Fatal("the late clone's cleanup never finished")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if ok, _ := s.zfs.Exists(ctx, ds); ok {
		t.Fatalf("%s still exists after its cleanup", ds)
	}
	if _, err := s.Create(ctx, driver.Spec{Name: "late", Kind: driver.KindBlock}); err != nil {
		t.Fatalf("Create after the cleanup: %v", err)
	}
	// A command that failed or exited is not taken over: its caller's own rollback applies.
	if s.cleanupLate("other", parent+"/vol/other", errors.New("exit status 1"), s.log) {
		t.Fatal("cleanupLate took over an error that is not an abandoned command")
	}
}

// TestCreateOutOfTimeLeavesNothing: a Create whose caller's deadline leaves no room for the work
// and its rollback fails at once, says why with the pool's sync times, and makes nothing.
func TestCreateOutOfTimeLeavesNothing(t *testing.T) {
	s, parent := openInternal(t)
	before := harness.ZFSInventory(t, parent)
	ctx, cancel := context.WithTimeout(context.Background(), rollbackReserve-time.Second)
	defer cancel()
	start := time.Now()
	_, err := s.Create(ctx, driver.Spec{Name: "late", Kind: driver.KindBlock})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v, want a deadline error", err)
	}
	if took := time.Since(start); took > rollbackReserve {
		t.Fatalf("the Create took %s, past its caller's deadline", took)
	}
	pool := harness.RequireZFS(t)
	if !strings.Contains(err.Error(), "pool "+pool+" took up to") || !strings.Contains(err.Error(), "nothing was left behind") {
		t.Fatalf("the error does not say what the pool's sync times were: %v", err)
	}
	if after := harness.ZFSInventory(t, parent); strings.Join(after, " ") != strings.Join(before, " ") {
		t.Fatalf("the failed Create left %v (before: %v)", after, before)
	}
}

// TestCreateReleasesSwapOnceCloned: a Create holds the promotion lock (swap) from its pick until
// its clone exists, not through the device wait. The pool's volumes get volmode=none, so ZFS
// makes no device for the clone and the Create waits its whole DeviceTimeout, as under a udev
// stall; during that wait a promotion must be able to take swap.
func TestCreateReleasesSwapOnceCloned(t *testing.T) {
	s, parent := openInternal(t)
	s.cfg.DeviceTimeout = 20 * time.Second
	ctx := context.Background()
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "f"), []byte("golden"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := driver.ImportTree(ctx, s, "prj", driver.KindBlock, src, func(driver.Progress) {}); err != nil {
		t.Fatal(err)
	}
	harness.Run(t, "zfs", "set", "volmode=none", parent+"/vol")
	done := make(chan error, 1)
	go func() {
		_, err := s.Create(ctx, driver.Spec{Name: "stalled", Kind: driver.KindBlock, Golden: "prj"})
		done <- err
	}()
	deadline := time.Now().Add(15 * time.Second)
	for {
		if ok, _ := s.zfs.Exists(ctx, parent+"/vol/stalled"); ok && s.swap.TryLock() {
			s.swap.Unlock()
			break
		}
		select {
		case err := <-done:
			t.Fatalf("the Create ended before the test saw its clone with swap free: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("swap stayed locked while the Create waited for its device")
		}
		time.Sleep(50 * time.Millisecond)
	}
	select {
	case err := <-done:
		t.Fatalf("the Create returned before its device timeout (%v): volmode=none did not stall it", err)
	default:
	}
	if err := <-done; err == nil || !strings.Contains(err.Error(), "did not appear") {
		t.Fatalf("a Create whose device never appears: got %v, want the device timeout", err)
	}
	if ok, _ := s.zfs.Exists(ctx, parent+"/vol/stalled"); ok {
		t.Fatal("the failed Create left its clone")
	}
}

// TestStaleCreateIsMadeAgain: a dataset at vol/NAME that an earlier run's Create left (its clone
// or create landed after this store had listed its volumes, and the Create never returned) is
// destroyed and made again by a Create of NAME, for a clone and for an empty volume alike, and
// for a bare clone whatever its creation time. One with properties whose creation is not older
// than the store is no earlier run's, and is refused as existing.
func TestStaleCreateIsMadeAgain(t *testing.T) {
	s, parent := openInternal(t)
	g := importTiny(t, s, "prj", "golden")
	ctx := context.Background()
	if _, err := s.Load(ctx); err != nil {
		t.Fatal(err)
	}
	before := strconv.FormatInt(s.opened.Unix()-60, 10)
	harness.Run(t, "zfs", "clone", "-o", "zgolden:kind=block", "-o", "zgolden:created="+before, "-o", "zgolden:state=ready",
		"-o", "zgolden:golden=prj", "-o", "zgolden:generation="+strconv.Itoa(g.Number), g.Source, parent+"/vol/late")
	harness.Run(t, "zfs", "create", "-s", "-V", "64M", "-o", "zgolden:kind=block", "-o", "zgolden:created="+before,
		"-o", "zgolden:state=creating", parent+"/vol/cold")
	for _, spec := range []driver.Spec{
		{Name: "late", Kind: driver.KindBlock, Golden: "prj"},
		{Name: "cold", Kind: driver.KindBlock},
	} {
		v, err := s.Create(ctx, spec)
		if err != nil {
			t.Fatalf("Create %s over an earlier run's dataset: %v", spec.Name, err)
		}
		created := strings.TrimSpace(harness.Run(t, "zfs", "get", "-H", "-p", "-o", "value", "zgolden:created", v.Source))
		if created == before || v.Source != parent+"/vol/"+spec.Name {
			t.Errorf("Create %s returned %s with zgolden:created %s: the earlier run's dataset was not made again", spec.Name, v.Source, created)
		}
		if err := s.Remove(ctx, v); err != nil {
			t.Fatal(err)
		}
	}

	// A bare clone (bare.go) whose clone ZFS carried out after the store opened, as one a crash
	// interrupted can be: its creation time cannot say, and it is an earlier run's all the same.
	harness.Run(t, "zfs", "clone", g.Source, parent+"/vol/barelate")
	if v, err := s.Create(ctx, driver.Spec{Name: "barelate", Kind: driver.KindBlock, Golden: "prj"}); err != nil {
		t.Errorf("Create over an earlier run's bare clone: %v", err)
	} else if err := s.Remove(ctx, v); err != nil {
		t.Fatal(err)
	}

	// Made since the store opened: not an earlier run's, so not the store's to destroy.
	now := strconv.FormatInt(time.Now().Unix()+1, 10)
	harness.Run(t, "zfs", "create", "-s", "-V", "64M", "-o", "zgolden:created="+now, parent+"/vol/fresh")
	if _, err := s.Create(ctx, driver.Spec{Name: "fresh", Kind: driver.KindBlock, Golden: "prj"}); !errors.Is(err, driver.ErrExists) {
		t.Errorf("Create over a dataset made since the store opened: %v, want ErrExists", err)
	}
	if out := harness.Run(t, "zfs", "list", "-H", "-o", "name", parent+"/vol/fresh"); !strings.Contains(out, "fresh") {
		t.Errorf("the dataset made since the store opened is gone")
	}
}

// TestAbandonedMkfsIsWaitedFor: a fresh volume's mkfs.xfs that the kernel keeps past its
// Create's deadline (its writes queued behind a busy pool) holds the zvol open, so a destroy
// then fails as busy. The Create's cleanup waits for the mkfs to exit and then destroys the
// dataset, refusing the name as busy until it has; it does not leave it to the next start.
func TestAbandonedMkfsIsWaitedFor(t *testing.T) {
	s, parent := openInternal(t)
	old := command.KillGrace
	command.KillGrace = 100 * time.Millisecond
	t.Cleanup(func() { command.KillGrace = old })
	real, err := exec.LookPath("mkfs.xfs")
	if err != nil {
		t.Skip("no mkfs.xfs")
	}
	// A mkfs.xfs stand-in that answers -V as the real one and otherwise holds the device (its
	// last argument) open for four seconds in a child that keeps its output open, which is
	// what internal/command sees of a process stuck in the kernel.
	bin, mark := t.TempDir(), filepath.Join(t.TempDir(), "started")
	script := "#!/bin/sh\n" +
		`case "$1" in -V) exec ` + real + ` -V;; esac` + "\n" +
		`for dev; do :; done` + "\n" +
		`sleep 4 <"$dev" &` + "\n" +
		`: > ` + mark + "\n" +
		"wait\n"
	if err := os.WriteFile(filepath.Join(bin, "mkfs.xfs"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin+":"+os.Getenv("PATH"))
	ctx, cancel := untilMarked(mark) // the deadline comes once the stand-in holds the device
	defer cancel()
	ds := parent + "/vol/fresh"
	if _, err := s.Create(ctx, driver.Spec{Name: "fresh", Kind: driver.KindBlock, Size: 64 << 20}); err == nil {
		t.Fatal("a Create whose mkfs outlived its context succeeded")
	}
	bg := context.Background()
	if _, err := s.Create(bg, driver.Spec{Name: "fresh", Kind: driver.KindBlock, Size: 64 << 20}); !errors.Is(err, driver.ErrBusy) {
		t.Fatalf("a Create of the name while its abandoned mkfs runs: got %v, want busy", err)
	}
	for deadline := time.Now().Add(time.Minute); s.tomb.has("fresh"); time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the cleanup after the abandoned mkfs never finished")
		}
	}
	if ok, _ := s.zfs.Exists(bg, ds); ok {
		t.Fatalf("%s is left after the abandoned mkfs exited", ds)
	}
}
