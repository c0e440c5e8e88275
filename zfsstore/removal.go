package zfsstore

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/internal/retry"
	"github.com/zgolden/zgolden/zfsutil"
)

// Removal recorded now, carried out later.
//
// Moving a volume into the trash is a zfs rename, one sync task, and on a busy pool that waits
// tens of seconds for a transaction group (docs/design-facts.md, "Transaction groups"). With a
// record directory (Config.RecordDir) a Remove writes a removal record instead, durably
// (records.go: one overwrite and an fdatasync, no journal commit), and returns: the trash worker
// destroys the dataset in place later, pausing while Creates clone (their sync tasks come
// first), and deletes the record after the destroy.
//
// The truth, and when each part of it wins:
//   - A removal record (records.go, key removal/DATASET) names a dataset whose volume is gone.
//     While the dataset exists the record wins over its zgolden:* properties and over a claim
//     record naming it: Load lists neither, and hands the dataset to the worker. Once the
//     dataset is gone the record is spent, and Load deletes it.
//   - A Remove returns only after its record is durable. A host crash before that means the
//     Remove never returned (a torn record is no record), and the volume is still there.
//   - A Remove of a claimed spare that the finisher is renaming does not wait for the rename:
//     its record names the spare and, in Then, PARENT/vol/NAME. The finisher, when its rename
//     returns, records whichever holds the volume and hands it to the worker. Once the spare is
//     gone, Then is the removed volume: a Create of NAME waits for that hand-over first.
//   - A Create of a name whose old dataset still waits (PARENT/vol/NAME) first renames that
//     dataset into the trash and then deletes its record, so a record never names a dataset
//     that a later volume holds: the trash listing is the truth for what was renamed.
//
// Locks: trash.mu guards the maps only, and is never held across a zfs command or I/O. A
// claim's rm is held by Remove across its record's write, and by the finisher to look at and
// change renaming and removed; never across a zfs command.
// trash.place serialises the worker's destroy of a recorded dataset with a Create of the same
// name moving it into the trash (clearRemoval, under the driver's lock of that name), so the
// worker never destroys a PARENT/vol/NAME that a later Create made; each holds it across one zfs
// command, and clearRemoval also across the wait (30 s at most) for the moved zvol's device to
// give up the name. The worker takes no volume lock.

// removalRecord is the durable record of one removal.
type removalRecord struct {
	Name    string `json:"name"`
	Dataset string `json:"dataset"`
	Removed int64  `json:"removed"`
	// Then is where a claimed spare's rename was taking Dataset when the Remove came
	// (removeDuring). Once Dataset is gone, Then is the removed volume: no Create of Name can
	// have made it, since a Create of Name waits for that rename to be handed over first.
	Then string `json:"then,omitempty"`
}

// removeLater records volume name (held in ds) as removed and hands ds to the trash worker.
func (s *Store) removeLater(name string) error {
	ds := s.volDataset(name)
	c := s.claimOf(name)
	if c != nil {
		c.rm.Lock()
		if c.renaming {
			err := s.removeDuring(c)
			c.rm.Unlock()
			return err
		}
		c.removed = true // the finisher must not start a rename under the record
		c.rm.Unlock()
		c.mu.Lock() // a finisher past its check of removed returns at once
		defer c.mu.Unlock()
		if !c.done {
			ds = c.Dataset
		}
	}
	start := time.Now()
	err := s.writeRemoval(removalRecord{Name: name, Dataset: ds, Removed: start.Unix()})
	recordTook := time.Since(start)
	if err != nil {
		if c != nil {
			c.rm.Lock()
			c.removed = false // the volume stays; the finisher may rename it again
			c.rm.Unlock()
		}
		return err
	}
	s.cfg.Faults.Hit("remove:after-record")
	if c != nil && !c.done {
		s.endClaim(c) // the removal record wins over the claim record from here
	}
	s.trash.mu.Lock()
	s.trash.pending[ds] = 0
	s.trash.records[ds] = true
	s.trash.mu.Unlock()
	s.setGrowing(name, false)
	s.kickTrash()
	s.log.WithFields(logrus.Fields{"volume": name, "dataset": ds, "record_took": recordTook.Round(time.Microsecond).String()}).Debug("removal recorded; the dataset is destroyed in the background")
	return nil
}

// removeDuring records the removal of a claimed volume whose spare the finisher is renaming,
// without waiting for the rename (two sync tasks, transaction groups on a busy pool): the record
// names the spare and where it is going, and the finisher hands whichever holds the volume to
// the trash worker when its rename returns (handOverRemoved). Called with c.rm held, which the
// finisher needs before it looks at c.removed.
func (s *Store) removeDuring(c *claim) error {
	if err := s.writeRemoval(removalRecord{Name: c.Name, Dataset: c.Dataset, Then: s.volDataset(c.Name), Removed: time.Now().Unix()}); err != nil {
		return err
	}
	s.cfg.Faults.Hit("remove:during-rename")
	c.removed = true
	s.setGrowing(c.Name, false)
	s.log.WithFields(logrus.Fields{"volume": c.Name, "dataset": c.Dataset}).Debug("removal recorded while the spare is renamed; the finisher hands it to the trash")
	return nil
}

// clearRemoval gets a removed volume's dataset out of the way of a new volume of the same name:
// it renames PARENT/vol/NAME, when a removal still waits for it, into the trash.
func (s *Store) clearRemoval(ctx context.Context, name string) error {
	ds := s.volDataset(name)
	if !s.removalWaiting(ds) {
		return nil
	}
	s.trash.place.Lock() // the worker must not destroy ds while it is moved (destroyPending)
	defer s.trash.place.Unlock()
	if !s.removalWaiting(ds) {
		return nil // destroyed meanwhile
	}
	s.log.WithFields(logrus.Fields{"volume": name, "dataset": ds}).Info("a removed volume of this name is still being destroyed; moving it to the trash first")
	dev := held.take(ds)
	dst := s.trashRoot() + "/" + name + "." + strconv.FormatInt(time.Now().UnixNano(), 36)
	err := s.retryBusy(ctx, func() error { return s.zfs.Rename(ctx, ds, dst) })
	switch {
	case errors.Is(err, zfsutil.ErrNotFound): // destroyed behind zgolden's back
		s.closeDevice(dev, ds)
		dst = ""
	case err != nil:
		if dev != nil {
			held.hold(ds, dev)
		}
		return fmt.Errorf("%w: volume %s was removed and its dataset %s is still being destroyed: %v; retry shortly", driver.ErrBusy, name, ds, mapErr(err))
	case dev != nil:
		held.hold(dst, dev)
	}
	s.trash.mu.Lock()
	delete(s.trash.records, ds)
	delete(s.trash.pending, ds)
	if dst != "" {
		s.trash.pending[dst] = 0
	}
	s.trash.mu.Unlock()
	defer s.kickTrash() // once the hint has moved (below), so the worker finds the kept mount
	recErr := s.dropRemovalRecord(ds)
	var waitErr error
	if dst != "" {
		// The new volume's clone must not be made while the old device still has its name:
		// it would get no device (zfsutil.WaitNameGone; seen in the stress suite on zfs 2.4).
		// The hint moves once the device has its new name, as in trashVolume, and whether or
		// not the record's delete failed: left on the old name, it would give the next volume
		// of the name the removed one's XFS.
		waitErr = s.zfs.WaitNameGone(ctx, ds, 30*time.Second)
		s.renameHint(ds, dst)
	}
	if recErr != nil {
		return fmt.Errorf("delete the removal record of %s: %w", ds, recErr)
	}
	if waitErr != nil {
		return fmt.Errorf("%w: volume %s was removed and %v; retry shortly", driver.ErrBusy, name, waitErr)
	}
	return nil
}

// loadRemovals hands the datasets of recorded removals to the worker, deletes spent records, and
// returns the datasets still waiting, which Load must not list as volumes or claims.
func (s *Store) loadRemovals(ctx context.Context) (map[string]bool, error) {
	waiting := map[string]bool{}
	if s.cfg.RecordDir == "" {
		return waiting, nil
	}
	recs, err := s.removalRecords()
	if err != nil {
		return nil, err
	}
	for _, rec := range recs {
		ok, err := s.zfs.Exists(ctx, rec.Dataset)
		if err != nil {
			return nil, mapErr(err)
		}
		if !ok && rec.Then != "" {
			// Removed while its spare was renamed, and the crash came before the finisher
			// re-recorded it: the rename landed (Then exists) or never will.
			if then, err := s.zfs.Exists(ctx, rec.Then); err != nil {
				return nil, mapErr(err)
			} else if then {
				if err := s.writeRemoval(removalRecord{Name: rec.Name, Dataset: rec.Then, Removed: rec.Removed}); err != nil {
					return nil, err
				}
				s.trash.mu.Lock()
				s.trash.pending[rec.Then] = 0
				s.trash.records[rec.Then] = true
				s.trash.mu.Unlock()
				waiting[rec.Then] = true
			}
		}
		if !ok {
			if err := s.dropRemovalRecord(rec.Dataset); err != nil {
				return nil, err
			}
			continue
		}
		waiting[rec.Dataset] = true
		s.trash.mu.Lock()
		s.trash.pending[rec.Dataset] = 0
		s.trash.records[rec.Dataset] = true
		s.trash.mu.Unlock()
	}
	if len(waiting) > 0 {
		s.log.WithField("datasets", len(waiting)).Info("destroying volumes whose removal was recorded before the last stop")
		s.kickTrash()
	}
	return waiting, nil
}

// removalWaiting says whether ds is a removed volume's dataset not destroyed yet.
func (s *Store) removalWaiting(ds string) bool {
	s.trash.mu.Lock()
	defer s.trash.mu.Unlock()
	return s.trash.records[ds]
}

// yieldToCreates waits, up to limit, while Creates are cloning: the worker's destroys would
// lengthen the transaction groups those clones wait for (a destroy's group spends at least
// zfs_free_min_time_ms freeing the volume's blocks).
func (s *Store) yieldToCreates(ctx context.Context, limit time.Duration) {
	_ = retry.CreatesFirst.WithinTime(limit).Poll(ctx, func() (bool, error) { return s.cloning.Load() == 0, nil })
}
