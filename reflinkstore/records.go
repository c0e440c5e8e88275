package reflinkstore

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/internal/recordfile"
	"github.com/zgolden/zgolden/xfsutil"
)

// The reflink store's local records: claims of spares and removals of volumes.
//
// Why they exist: a claim (spares.go) and a Remove (volume.go) are each one rename in the store,
// and each must be durable before Docker hears that it happened. Syncing the store's directory
// makes it so, but that forces the store's journal, and on a store file the loop device turns
// the flush into an fsync of the whole store file, every session's writes in it: under the
// bench's load case that sync was most of a loaded Create's and Remove's time. A record in
// ROOT/.zgolden-reflink.records (internal/recordfile), outside the store, is one overwritten
// block and an fdatasync on the root's own filesystem.
//
// What they hold: "claim/ID" {name, created} and "removal/ID" {name}, ID being the image's file
// ID (inode number and birth time, fileID): the image a name had when the record was written,
// never a later image of the same name.
//
// When each is the truth:
//   - From the record's write until the background sync (syncer) has synced the directories
//     after it, the record is: the rename it names may not be on disk yet.
//   - After that the files are, and the syncer deletes the record. A removal's record waits for
//     the image's unlink too, so that a crash never brings a removed image back under a
//     temporary name with no record of it.
//   - Load, before anything else, carries out every record left (recoverRecords), then syncs and
//     deletes them. Only a crash of the host leaves work for it: a process killed after the
//     rename has its rename in the kernel's cache, which the next start reads.
//   - Without a record, the directories are the truth, as before records existed.
//
// internal/recordfile wants no two writes of one key to race. Each key here is written once, by
// the Create that took the spare out of the set or by the Remove that holds the volume's lock,
// and deleted once, by the syncer after that write has settled, or by the start before any.
//
// If the record cannot be written (the root's filesystem is full, say), the claim or Remove syncs
// the directory instead, as before: slower, never less durable.
const (
	recordsName = ".zgolden-reflink.records"
	claimKey    = "claim/"
	removalKey  = "removal/"
)

type claimRecord struct {
	Name    string `json:"name"`
	Created string `json:"created"` // the creation time the claim set, unix seconds
}

type removalRecord struct {
	Name string `json:"name"`
}

// recordSet is the record file, opened at first use, and the syncer's queue: the records whose
// renames (and, for a removal, unlink) have happened and wait for a directory sync before they
// are deleted.
type recordSet struct {
	file recordfile.Lazy

	mu      sync.Mutex
	pending []settled
	running bool // the syncer takes what settles
	killed  bool // abandoned as by kill -9 (tests): nothing more is written

	kick chan struct{}
	stop chan struct{}
	done chan struct{}
}

// settled is a record whose work is done, the fault point the syncer passes before deleting it
// (the same step as the ZFS store's, under the same name), and what to close once it is gone or
// left for the next start.
type settled struct {
	key, point string
	handled    chan struct{}
}

func (s *Store) recordPath() string { return filepath.Join(s.cfg.Root, recordsName) }

func (s *Store) recordFile() (*recordfile.File, error) {
	return s.recs.file.File(func() (*recordfile.File, error) {
		s.recs.mu.Lock()
		killed := s.recs.killed
		s.recs.mu.Unlock()
		if killed {
			return nil, errors.New("the store was stopped as by kill -9")
		}
		rf, err := recordfile.Open(s.recordPath())
		if err != nil {
			return nil, fmt.Errorf("open the record file %s: %w", s.recordPath(), err)
		}
		return rf, nil
	})
}

// putRecord writes key. An error means the record may not be durable: the caller syncs the
// directory itself instead.
func (s *Store) putRecord(key string, rec any) error {
	rf, err := s.recordFile()
	if err != nil {
		return err
	}
	return rf.PutJSON(key, rec)
}

// settle queues key for deletion after the next directory sync and wakes the syncer. The channel
// closes once the record is deleted, or left for the next start (a failed sync, a stop).
func (s *Store) settle(key, point string) <-chan struct{} {
	handled := make(chan struct{})
	s.recs.mu.Lock()
	if !s.recs.running {
		s.recs.mu.Unlock()
		close(handled)
		return handled
	}
	s.recs.pending = append(s.recs.pending, settled{key, point, handled})
	s.recs.mu.Unlock()
	select {
	case s.recs.kick <- struct{}{}:
	default:
	}
	return handled
}

// claimsPending counts the claims whose rename is not yet known to be on disk: their records.
func (s *Store) claimsPending() int {
	rf, err := s.recordFile()
	if err != nil {
		return 0
	}
	n := 0
	for _, k := range rf.Keys() {
		if strings.HasPrefix(k, claimKey) {
			n++
		}
	}
	return n
}

// startSyncer starts the goroutine that makes settled records' renames durable and deletes them.
// Syncs are batched: what settles during one sync waits for the next, so a burst of Creates and
// Removes costs the store one journal commit per sync, after their replies, not one each before.
func (s *Store) startSyncer() {
	s.recs.kick = make(chan struct{}, 1)
	s.recs.stop = make(chan struct{})
	s.recs.done = make(chan struct{})
	s.recs.running = true
	go func() {
		defer close(s.recs.done)
		for {
			select {
			case <-s.recs.kick:
				s.syncSettled()
			case <-s.recs.stop:
				s.syncSettled()
				return
			}
		}
	}()
}

// stopSyncer syncs what has settled and stops the syncer. Records still in use (a removal whose
// unlink is under way) stay in the file for the next start.
func (s *Store) stopSyncer() {
	s.recs.mu.Lock()
	running := s.recs.running
	s.recs.running = false
	s.recs.mu.Unlock()
	if running {
		close(s.recs.stop)
		<-s.recs.done
	}
}

func (s *Store) syncSettled() {
	s.recs.mu.Lock()
	batch, killed := s.recs.pending, s.recs.killed
	s.recs.pending = nil
	s.recs.mu.Unlock()
	defer func() {
		for _, b := range batch {
			close(b.handled)
		}
	}()
	if len(batch) == 0 || killed {
		return
	}
	if err := s.syncStoreDirs(); err != nil {
		// The records stay: the next start carries them out again, which is harmless.
		s.log.WithError(err).WithField("records", len(batch)).Error("could not sync the store's directories; their records stay until the next start")
		return
	}
	points := map[string]bool{}
	for _, b := range batch {
		if !points[b.point] {
			points[b.point] = true
			s.cfg.Faults.Hit(b.point)
		}
	}
	rf, err := s.recordFile()
	if err != nil {
		s.log.WithError(err).Error("could not open the record file to delete settled records; the next start does")
		return
	}
	for _, b := range batch {
		if err := rf.Delete(b.key); err != nil {
			s.log.WithError(err).WithField("record", b.key).Warn("could not delete a settled record; the next start does")
		}
	}
}

// syncStoreDirs makes every rename and unlink in the volumes and spares directories durable. A
// claim's rename moves an entry between the two; on XFS one sync covers both (one transaction),
// the second is for filesystems where it does not.
func (s *Store) syncStoreDirs() error {
	if err := xfsutil.SyncDir(s.volumesDir()); err != nil {
		return err
	}
	if exists(s.sparesDir()) {
		return xfsutil.SyncDir(s.sparesDir())
	}
	return nil
}

// recoverRecords carries out the records a crash left, before Load reads the directories.
// Removals go first: a claim may have given a name whose earlier image's removal was lost. The
// image a removal names is renamed to a removed name wherever it is (its volume's name, or still a
// spare if the claim that gave it the name was lost too), and the temporaries' cleanup deletes
// it; the spare a claim names is given its volume's name again.
func (s *Store) recoverRecords() error {
	rf, err := s.recordFile()
	if err != nil {
		return err
	}
	keys := rf.Keys()
	if len(keys) == 0 {
		return nil
	}
	for _, key := range keys {
		if !strings.HasPrefix(key, claimKey) && !strings.HasPrefix(key, removalKey) {
			return invalidRecord(rf, key, errors.New("it is neither a claim nor a removal"))
		}
	}
	spares, err := s.sparesByID()
	if err != nil {
		return err
	}
	for _, key := range keys {
		id, ok := strings.CutPrefix(key, removalKey)
		if !ok {
			continue
		}
		var rec removalRecord
		if err := readRecord(rf, key, &rec); err != nil {
			return err
		}
		if err := driver.ValidateName(rec.Name); err != nil {
			return invalidRecord(rf, key, err)
		}
		if err := s.redoRemoval(id, rec, spares); err != nil {
			return err
		}
		delete(spares, id)
	}
	for _, key := range keys {
		id, ok := strings.CutPrefix(key, claimKey)
		if !ok {
			continue
		}
		var rec claimRecord
		if err := readRecord(rf, key, &rec); err != nil {
			return err
		}
		if err := driver.ValidateName(rec.Name); err != nil {
			return invalidRecord(rf, key, err)
		}
		if _, err := strconv.ParseInt(rec.Created, 10, 64); err != nil {
			return invalidRecord(rf, key, fmt.Errorf("creation time: %w", err))
		}
		if err := s.redoClaim(id, rec, spares); err != nil {
			return err
		}
	}
	if err := s.syncStoreDirs(); err != nil {
		return err
	}
	for _, key := range keys {
		if err := rf.Delete(key); err != nil {
			return fmt.Errorf("delete the record %s after carrying it out: %w", key, err)
		}
	}
	return nil
}

func readRecord(rf *recordfile.File, key string, into any) error {
	data, _ := rf.Get(key)
	if err := json.Unmarshal(data, into); err != nil {
		return invalidRecord(rf, key, err)
	}
	return nil
}

// invalidRecord stops the start: a record this code did not write may be one it cannot carry out.
func invalidRecord(rf *recordfile.File, key string, why error) error {
	return fmt.Errorf("record %q in %s is invalid (%v); stop zgolden and check the volume it names: the file only matters after a host crash, for claims and removals that had answered Docker, and can be moved away once that is checked", key, rf.Path(), why)
}

// sparesByID maps the file ID of each spare image in STORE/spares to its path.
func (s *Store) sparesByID() (map[string]string, error) {
	out := map[string]string{}
	entries, err := os.ReadDir(s.sparesDir())
	if errors.Is(err, os.ErrNotExist) {
		return out, nil
	}
	if err != nil {
		return nil, err
	}
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), imgExt) || strings.HasPrefix(e.Name(), tmpPrefix) {
			continue
		}
		p := filepath.Join(s.sparesDir(), e.Name())
		if id, err := fileID(p); err == nil {
			out[id] = p
		}
	}
	return out, nil
}

// idAt is the file ID of path, or "" when there is no file.
func idAt(path string) (string, error) {
	id, err := fileID(path)
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	return id, err
}

func (s *Store) redoRemoval(id string, rec removalRecord, spares map[string]string) error {
	img, err := s.volumeImage(rec.Name)
	if err != nil {
		return err
	}
	log := s.log.WithFields(logrus.Fields{"volume": rec.Name, "file_id": id})
	at, err := idAt(img)
	if err != nil {
		return err
	}
	dir, path := s.volumesDir(), img
	if at != id {
		if path = spares[id]; path == "" {
			return nil // renamed or deleted before the crash: nothing left to do
		}
		dir = s.sparesDir()
	}
	gone, err := removedName(dir, rec.Name)
	if err != nil {
		return err
	}
	if err := os.Rename(path, gone); err != nil {
		return fmt.Errorf("finish the removal of volume %q (record: %s): %w", rec.Name, path, err)
	}
	log.WithField("image", path).Warn("a removal the crash undid is done again; its image is deleted with the temporaries")
	return nil
}

func (s *Store) redoClaim(id string, rec claimRecord, spares map[string]string) error {
	img, err := s.volumeImage(rec.Name)
	if err != nil {
		return err
	}
	log := s.log.WithFields(logrus.Fields{"volume": rec.Name, "file_id": id, "image": img})
	sp := spares[id]
	if sp == "" {
		return nil // the claim's rename is on disk, or the volume was removed after it
	}
	if err := setAttr(sp, attrCreated, rec.Created); err != nil {
		return fmt.Errorf("finish the claim of volume %q: %w", rec.Name, mapErr(err))
	}
	if err := unix.Renameat2(unix.AT_FDCWD, sp, unix.AT_FDCWD, img, unix.RENAME_NOREPLACE); errors.Is(err, unix.EEXIST) {
		// Another image has the name: the claim cannot be the volume's last word. The spare stays a
		// spare, and the start carries on.
		log.WithField("spare", sp).Error("a claim the crash undid names a volume that has another image now; the spare stays a spare")
		return nil
	} else if err != nil {
		return fmt.Errorf("finish the claim of volume %q (spare %s): %w", rec.Name, sp, mapErr(err))
	}
	log.WithField("spare", sp).Warn("a claim the crash undid is done again")
	return nil
}

// abandonRecords stops the syncer and closes the record file without syncing or deleting
// anything, as a kill -9 would: for tests that open a second store on the same root.
func (s *Store) abandonRecords() {
	s.recs.mu.Lock()
	s.recs.killed = true
	s.recs.mu.Unlock()
	s.stopSyncer()
	s.recs.file.Close()
}

// closeRecords stops the syncer and closes the record file.
func (s *Store) closeRecords() error {
	s.stopSyncer()
	return s.recs.file.Close()
}
