package zfsstore

import (
	"context"
	"errors"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/zgolden/zgolden/internal/retry"
	"github.com/zgolden/zgolden/zfsutil"
)

// Removal in the background.
//
// zfs destroy waits for the transaction group that carries it, and that group spends at least
// zfs_free_min_time_ms (1 s by default) freeing the destroyed clone's own blocks when it has any:
// make bench measured a Remove at 0.17 s for a clone with nothing written and 1.15 s with 1 GB or
// 3 GB (the raw zfs destroy the same; 0.19-0.35 s with the tunable at 50 ms). So Remove renames
// the volume into PARENT/trash, which frees its name at once and takes the same time whatever the
// volume holds, and a worker destroys it from there. ZFS frees a destroyed dataset's blocks in
// the background anyway (async_destroy); this moves the wait for it off the caller too.
//
// Rules:
//   - Only Remove puts datasets in the trash, only emptyTrash destroys them, one emptier at a
//     time (trash.run), so two destroys of one dataset never race.
//   - A trashed volume is no longer a volume: Load lists PARENT/vol only, and hands whatever it
//     finds in the trash (a crash between rename and destroy) to the worker.
//   - A trashed clone still pins its generation's snapshot: RemoveGeneration and RemoveGolden
//     empty the trash first, so a generation whose last volume was just removed is reclaimable
//     at once, as it was when Remove destroyed.
//   - A destroy that keeps failing stays in the trash, retried with a growing pause (up to 5
//     minutes) and logged each time; Status reports how many wait.
//   - A removed volume's device that Unmount held open (held.go) travels with it, and is closed
//     just before its destroy: the close is where the wait for the pool goes.
//   - The worker's destroys run under the store's context, which Close cancels; each is bounded
//     by zfsutil.CommandTimeout.
type trash struct {
	run sync.Mutex // held by the one emptyTrash running
	// place is held while a recorded removal's dataset (still at PARENT/vol/NAME) is destroyed,
	// and by a Create of NAME while it moves that dataset away (removal.go). It is held across
	// that one zfs destroy or rename, each bounded by zfsutil.CommandTimeout.
	place   sync.Mutex
	mu      sync.Mutex
	pending map[string]int  // dataset -> failed destroys so far
	records map[string]bool // datasets of pending that have a removal record (removal.go)
	wake    chan struct{}
	once    sync.Once
	cancel  context.CancelFunc
	done    chan struct{} // closed when the worker has stopped
}

// trashRetryMax bounds the pause between destroys of a dataset that keeps failing.
const trashRetryMax = 5 * time.Minute

func (s *Store) trashRoot() string { return s.cfg.Parent + "/trash" }

// startTrash starts the worker that empties the trash; it runs until Close.
func (s *Store) startTrash() {
	s.trash.once.Do(func() {
		s.trash.pending = map[string]int{}
		s.trash.records = map[string]bool{}
		s.trash.wake = make(chan struct{}, 1)
		s.trash.done = make(chan struct{})
		ctx, cancel := context.WithCancel(context.Background())
		s.trash.cancel = cancel
		go func() {
			defer close(s.trash.done)
			for {
				select {
				case <-ctx.Done():
					return
				case <-s.trash.wake:
					_ = s.emptyTrash(ctx, true)
				}
			}
		}()
	})
}

// stopTrash stops the worker, waiting for it until ctx is done. What it has not destroyed stays
// in the trash for the next start.
func (s *Store) stopTrash(ctx context.Context) error {
	if s.trash.cancel == nil {
		return nil
	}
	s.trash.cancel()
	select {
	case <-s.trash.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s *Store) kickTrash() {
	select {
	case s.trash.wake <- struct{}{}:
	default: // a wake is already due
	}
}

// trashVolume moves a volume's dataset into the trash and hands it, with its held device (or
// nil), to the worker.
func (s *Store) trashVolume(ctx context.Context, ds, name string, dev *os.File) error {
	dst := s.trashRoot() + "/" + name + "." + strconv.FormatInt(time.Now().UnixNano(), 36)
	if err := s.retryBusy(ctx, func() error { return s.zfs.Rename(ctx, ds, dst) }); err != nil {
		return err
	}
	if dev != nil {
		held.hold(dst, dev)
	}
	if inside(s.volRoot(), ds) {
		// A Create of the same name right after this must not clone while the old device still
		// has the name: ZFS would give the new zvol no device (zfsutil.WaitNameGone). The stress
		// suite hit that on zfs 2.1 with a Remove and a Create of one name back to back. The
		// volume is in the trash already, so a wait that gives up does not fail the Remove.
		if err := s.zfs.WaitNameGone(ctx, ds, 30*time.Second); err != nil {
			s.log.WithError(err).WithFields(logrus.Fields{"volume": name, "dataset": ds}).Warn("the removed volume's device kept its name; a Create of the same name may find no device")
		}
	}
	// Only now, with the device answering to its new name (or after the wait gave up), does the
	// hint move: a scan of the early mounts in between asked the device its name, which ZFS
	// renames from a task queue after the rename returns, and may have put the hint back on
	// the old name; moving it now discards such a scan (scanPremounts). On zfs 2.1 the stress
	// suite saw the hint of a new volume of the name point at the removed one's XFS that way:
	// the removed one's destroy stayed busy until the new one was destroyed.
	s.renameHint(ds, dst)
	s.trash.mu.Lock()
	s.trash.pending[dst] = 0
	s.trash.mu.Unlock()
	s.kickTrash()
	return nil
}

// loadTrash hands what a previous run left in the trash to the worker.
func (s *Store) loadTrash(ctx context.Context) error {
	rows, err := s.zfs.List(ctx, s.trashRoot(), []string{"volume", "filesystem"}, []string{"type"})
	if err != nil {
		return mapErr(err)
	}
	n := 0
	s.trash.mu.Lock()
	for _, r := range rows {
		if name := r["name"]; strings.HasPrefix(name, s.trashRoot()+"/") {
			if _, ok := s.trash.pending[name]; !ok {
				s.trash.pending[name] = 0
				n++
			}
		}
	}
	s.trash.mu.Unlock()
	if n > 0 {
		s.log.WithField("datasets", n).Info("destroying volumes removed before the last stop")
		s.kickTrash()
	}
	return nil
}

// emptyTrash destroys every dataset in the trash and returns the first failure; failed ones stay,
// and the worker retries them later. The worker yields to Creates before each destroy; callers
// that need the trash empty before they go on (RemoveGeneration, RemoveGolden) do not.
func (s *Store) emptyTrash(ctx context.Context, yield bool) error {
	s.trash.run.Lock()
	defer s.trash.run.Unlock()
	s.trash.mu.Lock()
	todo := make([]string, 0, len(s.trash.pending))
	for ds := range s.trash.pending {
		todo = append(todo, ds)
	}
	s.trash.mu.Unlock()
	var first error
	retry := time.Duration(0)
	for _, ds := range todo {
		if yield {
			s.yieldToCreates(ctx, 30*time.Second)
		}
		failures, err := s.destroyPending(ctx, ds)
		if err != nil {
			s.log.WithError(err).WithField("dataset", ds).Warn("could not destroy a removed volume; retrying later")
			pause := min(5*time.Second<<min(failures, 6), trashRetryMax)
			if retry == 0 || pause < retry {
				retry = pause
			}
			if first == nil {
				first = err
			}
		}
	}
	if retry > 0 {
		time.AfterFunc(retry, s.kickTrash)
	}
	return first
}

// destroyPending destroys one pending dataset and, when it had a removal record, deletes the
// record, and returns how many times its destroy has failed. A recorded dataset is destroyed
// under trash.place, which a Create of the same name takes to move it out of the way
// (clearRemoval): without it the worker could destroy PARENT/vol/NAME after that Create had made
// a new volume there.
func (s *Store) destroyPending(ctx context.Context, ds string) (int, error) {
	s.trash.mu.Lock()
	recorded := s.trash.records[ds]
	s.trash.mu.Unlock()
	if recorded {
		s.trash.place.Lock()
		defer s.trash.place.Unlock()
	}
	s.trash.mu.Lock()
	_, still := s.trash.pending[ds]
	recorded = s.trash.records[ds]
	s.trash.mu.Unlock()
	if !still {
		return 0, nil // a Create of its name moved it into the trash (clearRemoval)
	}
	s.closeDevice(held.take(ds), ds)
	if err := s.destroyVolume(ctx, ds); err != nil {
		s.trash.mu.Lock()
		defer s.trash.mu.Unlock()
		s.trash.pending[ds]++
		return s.trash.pending[ds], err
	}
	if recorded {
		s.cfg.Faults.Hit("trash:after-destroy")
		if err := s.dropRemovalRecord(ds); err != nil {
			// Harmless: Load finds the dataset gone and deletes the spent record.
			s.log.WithError(err).WithField("dataset", ds).Warn("could not delete a spent removal record")
		}
	}
	s.trash.mu.Lock()
	delete(s.trash.pending, ds)
	delete(s.trash.records, ds)
	s.trash.mu.Unlock()
	s.log.WithField("dataset", ds).Debug("destroyed a removed volume")
	return 0, nil
}

// trashPending is how many removed volumes wait to be destroyed.
func (s *Store) trashPending() int {
	s.trash.mu.Lock()
	defer s.trash.mu.Unlock()
	return len(s.trash.pending)
}

// retryBusy runs op until it succeeds or fails with something other than "busy", by the policy
// retry.BusyDataset: udev and blkid probe a zvol right after it appears, changes or disappears
// and hold it open for a moment, which makes a destroy or rename fail with "dataset is busy"
// (docs/design-facts.md, "Busy devices").
func (s *Store) retryBusy(ctx context.Context, op func() error) error {
	return retry.BusyDataset.Do(ctx, func(err error) bool { return errors.Is(err, zfsutil.ErrBusy) }, op)
}
