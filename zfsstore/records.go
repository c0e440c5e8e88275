package zfsstore

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/internal/proclock"
	"github.com/zgolden/zgolden/internal/recordfile"
	"github.com/zgolden/zgolden/xfsutil"
)

// The local records: claims of spares (spares.go) and recorded removals (removal.go).
//
// They live in one record file per parent, RECORD_DIR/PARENT%/records (internal/recordfile),
// keyed "claim/NAME" and "removal/DATASET", each value the record's JSON. A record is written or
// deleted with one overwrite of a block written ahead and an fdatasync, so the Create or Remove
// that waits for it does not wait for the filesystem's journal, which on a busy host queues behind
// everyone else's I/O. Which record wins over ZFS, and when, is written beside each kind; the
// file only makes a record durable before its caller returns, or not at all.
//
// Releases before this one wrote each record to its own JSON file (RECORD_DIR/PARENT%/NAME.json,
// and removing/DATASET%.json beneath it). Load moves those into the record file: each is written
// there before its file is deleted, so a crash in between leaves it in both, never in neither.

const (
	claimKey   = "claim/"
	removalKey = "removal/"
)

// RecordFile is where a parent's records are kept under recordDir, for tests and tools that look
// at a running store's records (recordfile.ReadKeys).
func RecordFile(recordDir, parent string) string {
	return filepath.Join(recordDir, strings.ReplaceAll(parent, "/", "%"), "records")
}

// lockParent locks RECORD_DIR/PARENT/lock for the life of the process (internal/proclock), so a
// second zgolden on the same parent (a managed plugin and a systemd service, say, or a restart
// that overlaps the old process) fails at start instead of writing the same free slot of the
// record file as the first, finishing its claims or destroying its removals. Without a record
// directory there is no file to lock, and nothing local to share.
func (s *Store) lockParent() error {
	if s.cfg.RecordDir == "" {
		return nil
	}
	dir := filepath.Dir(RecordFile(s.cfg.RecordDir, s.cfg.Parent))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("make the record directory (--record-dir %s): %w", s.cfg.RecordDir, err)
	}
	lk, err := proclock.Take(filepath.Join(dir, "lock"))
	var held *proclock.HeldError
	if errors.As(err, &held) {
		return fmt.Errorf("%w: another process (pid %d) is serving the parent dataset %s with the record directory %s; run one zgolden per parent dataset, and stop the other one first", driver.ErrBusy, held.Pid, s.cfg.Parent, s.cfg.RecordDir)
	}
	if err != nil {
		return fmt.Errorf("lock the parent dataset's records (--record-dir %s): %w", s.cfg.RecordDir, err)
	}
	s.lock = lk
	return nil
}

func (s *Store) recordFile() (*recordfile.File, error) {
	return s.recs.File(func() (*recordfile.File, error) {
		rf, err := recordfile.Open(RecordFile(s.cfg.RecordDir, s.cfg.Parent))
		if err != nil {
			return nil, fmt.Errorf("open the record file (--record-dir %s): %w", s.cfg.RecordDir, err)
		}
		// Once per open, before any record is read or written: the next open tries again.
		if err := s.migrateRecords(rf); err != nil {
			rf.Close()
			return nil, err
		}
		return rf, nil
	})
}

func (s *Store) closeRecords() error { return s.recs.Close() }

func (s *Store) putRecord(key string, rec any) error {
	rf, err := s.recordFile()
	if err != nil {
		return err
	}
	return rf.PutJSON(key, rec)
}

func (s *Store) dropRecord(key string) error {
	rf, err := s.recordFile()
	if err != nil {
		return err
	}
	return rf.Delete(key)
}

// writeRecord writes a claim record durably.
func (s *Store) writeRecord(rec claimRecord) error { return s.putRecord(claimKey+rec.Name, rec) }

func (s *Store) deleteRecord(name string) error { return s.dropRecord(claimKey + name) }

// writeRemoval writes rec durably, under its dataset's name.
func (s *Store) writeRemoval(rec removalRecord) error {
	if err := s.putRecord(removalKey+rec.Dataset, rec); err != nil {
		return fmt.Errorf("record the removal of %s: %w", rec.Name, err)
	}
	return nil
}

// dropRemovalRecord deletes ds's removal record once ds is destroyed or renamed into the trash.
func (s *Store) dropRemovalRecord(ds string) error { return s.dropRecord(removalKey + ds) }

// recordKind is what readRecords needs to know of one kind of record.
type recordKind struct {
	key    string // claimKey or removalKey
	noun   string // for messages: "claim record"
	wrong  string // why a record that check refuses is invalid
	advice string // what the operator should do about an invalid one
}

// readRecords decodes the records of kind k, in key order. check is given the key without its
// kind; a record it refuses, or that does not decode, stops the read.
func readRecords[T any](s *Store, k recordKind, check func(key string, rec T) bool) ([]T, error) {
	rf, err := s.recordFile()
	if err != nil {
		return nil, err
	}
	var out []T
	for _, key := range rf.Keys() { // sorted
		rest, ok := strings.CutPrefix(key, k.key)
		if !ok {
			continue
		}
		data, _ := rf.Get(key)
		var rec T
		err := json.Unmarshal(data, &rec)
		if err == nil && !check(rest, rec) {
			err = errors.New(k.wrong)
		}
		if err != nil {
			return nil, fmt.Errorf("%s %q in %s is invalid (%v); %s", k.noun, key, rf.Path(), err, k.advice)
		}
		out = append(out, rec)
	}
	return out, nil
}

// claimRecords reads the claim records, refusing any that does not name a spare of this parent.
func (s *Store) claimRecords() ([]claimRecord, error) {
	k := recordKind{claimKey, "claim record", "it names no spare of this parent",
		"stop zgolden, check the volume it names, and delete the record file only if no claimed spare is waiting for its rename"}
	return readRecords(s, k, func(name string, rec claimRecord) bool {
		return rec.Name == name && driver.ValidateName(name) == nil && inside(s.spareRoot(), rec.Dataset)
	})
}

// removalRecords reads the removal records, refusing any that does not name a dataset of this
// parent's volumes or spares.
func (s *Store) removalRecords() ([]removalRecord, error) {
	k := recordKind{removalKey, "removal record", "it names no dataset of this parent's volumes or spares",
		"stop zgolden and check what it names"}
	return readRecords(s, k, func(ds string, rec removalRecord) bool {
		return rec.Dataset == ds && driver.ValidateName(rec.Name) == nil &&
			(inside(s.volRoot(), rec.Dataset) || inside(s.spareRoot(), rec.Dataset)) &&
			(rec.Then == "" || rec.Then == s.volDataset(rec.Name))
	})
}

// migrateRecords moves the JSON record files of an earlier release into rf: each is written to
// rf, durably, before its file is deleted. A file that cannot be read stops Load, as it did then.
func (s *Store) migrateRecords(rf *recordfile.File) error {
	dir := filepath.Dir(rf.Path())
	for _, m := range []struct{ dir, kind string }{{dir, claimKey}, {filepath.Join(dir, "removing"), removalKey}} {
		// A crash inside that release's atomic write left a temporary: the write never returned.
		tmps, _ := filepath.Glob(filepath.Join(m.dir, ".tmp-*"))
		for _, tmp := range tmps {
			_ = os.Remove(tmp)
		}
		files, err := filepath.Glob(filepath.Join(m.dir, "*.json"))
		if err != nil || len(files) == 0 {
			continue
		}
		for _, file := range files {
			data, err := os.ReadFile(file)
			key := ""
			if err == nil {
				var rec struct{ Name, Dataset string }
				if err = json.Unmarshal(data, &rec); err == nil {
					key = m.kind + rec.Name
					if m.kind == removalKey {
						key = m.kind + rec.Dataset
					}
				}
			}
			if err == nil && key == m.kind {
				err = errors.New("it names nothing")
			}
			if err != nil {
				return fmt.Errorf("record %s, from an earlier release, is unreadable (%v); move it away once you have checked what it names", file, err)
			}
			if err := rf.Put(key, data); err != nil {
				return err
			}
			if err := os.Remove(file); err != nil {
				return err
			}
		}
		if err := xfsutil.SyncDir(m.dir); err != nil {
			return err
		}
		s.log.WithField("records", len(files)).Info("moved the records of an earlier release into the record file")
	}
	_ = os.Remove(filepath.Join(dir, "removing")) // empty now, or left alone
	return nil
}
