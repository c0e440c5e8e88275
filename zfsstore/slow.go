package zfsstore

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/internal/command"
	"github.com/zgolden/zgolden/zfsutil"
)

// A busy pool: deadlines that hold, and rollbacks that finish after the reply.
//
// Every ZFS admin command waits for a transaction group to sync; under heavy write load one
// takes tens of seconds (docs/design-facts.md, "Transaction groups"). The plugin's callers have
// deadlines (Docker's 2 minutes for Create). So:
//   - A Create works until its context's deadline less rollbackReserve, and then gives up with an
//     error that says how long the pool has been taking to sync.
//   - A zfs command that outlives its deadline is abandoned (internal/command): the kernel may
//     still carry it out. When that command was a clone (or a fresh volume's mkfs.xfs, which
//     holds the zvol open), the name is tombstoned: the dataset is destroyed once the command
//     has exited, and until then a Create of that name is refused
//     (busy, retry), so the late clone is never taken for the new volume, nor destroyed after a
//     new one was made in its place.
//   - A rollback waits rollbackWait at most; if the destroy takes longer, it goes on in the
//     background under the same tombstone. Load destroys whatever a crash left of it.
const (
	rollbackWait    = 10 * time.Second
	rollbackReserve = rollbackWait + 5*time.Second
)

type tombstones struct {
	mu    sync.Mutex
	names map[string]string // volume name -> dataset being cleaned up
}

func (t *tombstones) set(name, ds string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.names == nil {
		t.names = map[string]string{}
	}
	if _, ok := t.names[name]; ok {
		return false
	}
	t.names[name] = ds
	return true
}

func (t *tombstones) clear(name string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.names, name)
}

func (t *tombstones) has(name string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	_, ok := t.names[name]
	return ok
}

func (t *tombstones) count() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.names)
}

// workContext is ctx with its deadline moved rollbackReserve earlier, so that a Create that runs
// out of time still has time to undo what it made before its caller gives up.
func workContext(ctx context.Context) (context.Context, context.CancelFunc) {
	if d, ok := ctx.Deadline(); ok {
		return context.WithDeadline(ctx, d.Add(-rollbackReserve))
	}
	return context.WithCancel(ctx)
}

// cleanupLate destroys ds once cmdErr's abandoned command has exited, tombstoning name until it
// has. It reports whether it took over (cmdErr was an abandoned command).
func (s *Store) cleanupLate(name, ds string, cmdErr error, log *logrus.Entry) bool {
	var cerr *command.Error
	if !errors.Is(cmdErr, command.ErrAbandoned) || !errors.As(cmdErr, &cerr) || !s.tomb.set(name, ds) {
		return false
	}
	log.WithField("command", cerr.Argv[0]).Warn("a command outlived its deadline; what it made is destroyed once it has exited")
	go func() {
		defer s.tomb.clear(name)
		<-cerr.Exited
		ctx, cancel := context.WithTimeout(context.Background(), zfsutil.CommandTimeout)
		defer cancel()
		if err := s.destroy(ctx, ds, true); err != nil {
			log.WithError(err).Error("could not destroy what a timed-out create made; it is destroyed at the next start")
			return
		}
		log.Info("destroyed what a timed-out create made")
	}()
	return true
}

// clearStale destroys ds when it is what an earlier process's Create left behind: a clone or
// create that a crash (or a kill at its deadline) interrupted, which ZFS carried out after this
// store had listed its volumes. Its Create never returned, so nobody was given it and nobody
// wrote to it; without this, every Create of its name would fail with "exists" until the next
// start. A dataset is stale when its zgolden:created is older than this store's opening: a
// Create of this process would be known to the driver, which then never calls Create for it.
// It returns whether ds was destroyed and may be made again.
func (s *Store) clearStale(ctx context.Context, name, ds string, log *logrus.Entry) bool {
	row, err := s.zfs.Get(ctx, ds, append([]string{propCreated, propState}, bareProps...)...)
	if err != nil {
		return false
	}
	// A bare clone (bare.go) is always an earlier run's: this process's own Creates that failed
	// late are tombstoned (cleanupLate), which freeName refuses before any clone. Its creation
	// time is when ZFS carried the clone out, which for a clone a crash interrupted can be after
	// this store opened, so the time cannot say.
	bare := s.fillBare(row)
	created, err := strconv.ParseInt(row[propCreated], 10, 64)
	if err != nil || created >= s.opened.Unix() && !bare || s.claimOf(name) != nil {
		return false
	}
	log = log.WithField("created", time.Unix(created, 0).UTC().Format(time.RFC3339))
	log.Warn("the dataset is left from a Create that an earlier run of the plugin never finished; destroying it and making the volume again")
	if err := s.destroy(ctx, ds, true); err != nil {
		log.WithError(err).Error("could not destroy the dataset an earlier Create left")
		return false
	}
	return true
}

// rollback destroys what a failed operation made (name is the volume, or the dataset itself for
// goldens), logging (not returning) a failure to do so,
// since the operation's own error is what the caller must see. It waits rollbackWait at most:
// after that the destroy goes on in the background, with name tombstoned until it is done.
func (s *Store) rollback(ctx context.Context, log *logrus.Entry, name, ds string) {
	if !s.tomb.set(name, ds) {
		return // a cleanup of this name is already under way
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer s.tomb.clear(name)
		// The caller's context may be what expired; cleaning up still deserves a bounded try.
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), zfsutil.CommandTimeout)
		defer cancel()
		if err := s.destroy(cctx, ds, true); err != nil {
			log.WithError(err).Error("rollback: could not destroy partial dataset; it is destroyed at the next start")
		} else {
			log.Info("rolled back partial dataset")
		}
	}()
	select {
	case <-done:
	case <-time.After(rollbackWait):
		log.Warn("rollback: the destroy is waiting for the pool; it goes on in the background")
	}
}

// refuseTombstoned fails a Create of a name whose earlier dataset is still being cleaned up.
func (s *Store) refuseTombstoned(name string) error {
	if !s.tomb.has(name) {
		return nil
	}
	return fmt.Errorf("%w: an earlier create of %q ran out of time and ZFS is still finishing it; it is destroyed as soon as ZFS returns: retry in a minute", driver.ErrBusy, name)
}

// slowPool adds to a deadline error how long the pool has been taking to sync.
func (s *Store) slowPool(err error) error {
	if err == nil || !errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	pool := zfsutil.PoolOf(s.cfg.Parent)
	txgs, terr := zfsutil.TxgSyncs(pool)
	if terr != nil {
		return fmt.Errorf("%w (ran out of time; ZFS admin commands wait for the pool to sync a transaction group, and the pool may be under heavy write load)", err)
	}
	worst, last := syncStats(txgs, 10)
	return fmt.Errorf("%w: ran out of time waiting for ZFS; pool %s took up to %s to sync each of its last transaction groups (the last %s), and every zfs clone, rename or destroy waits for one; nothing was left behind: retry when the pool is less busy (see the README's Troubleshooting)",
		err, pool, worst.Round(100*time.Millisecond), last.Round(100*time.Millisecond))
}

// syncStats returns the longest and the latest sync time of the last n synced txgs.
func syncStats(txgs []zfsutil.TxgSync, n int) (worst, last time.Duration) {
	seen := 0
	for i := len(txgs) - 1; i >= 0 && seen < n; i-- {
		if !txgs[i].Complete {
			continue
		}
		if seen == 0 {
			last = txgs[i].Sync
		}
		worst = max(worst, txgs[i].Sync)
		seen++
	}
	return worst, last
}
