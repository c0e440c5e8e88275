package reflinkstore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/xfsutil"
)

// Warm spares (Config.Spares): images of each block project's newest generation, reflinked and
// their XFS mounted ahead of time, so that a Create on a busy host is a rename and a Mount a bind.
//
// Under the load case a reflink Create+Mount took 30-50 ms against 8 idle: the Create's reflink
// and two fsyncs, and most of all the Mount's XFS mount, which reads and writes the XFS log
// through the loop device behind every other writer on the disk. A spare has done both. Its
// image lives in STORE/spares and its XFS is kept mounted at WORKDIR/kept-INO (kept.go). A
// Create of the generation (no -o size) claims one: it sets the creation time and renames the
// image to the volume's name (RENAME_NOREPLACE) and syncs the directory. The inode does not change
// in a rename, so the kept mount now belongs to the volume, and its Mount binds it.
//
// A spare carries a volume's attributes (golden, generation, kind, state) and one of its own, the
// identity of the generation image it was cloned from (attrSpareOf: its inode number and birth
// time, since a deleted file's inode number is soon given to a new file): a claim takes only a
// spare whose generation is the project's newest and whose source is that generation's image as
// it is now, so a golden removed and imported again under the same name and number never hands
// out the old one's content. The files and the mount table are the only records: a claim is the
// rename, durable once the directory is synced before Create returns; a crash before that leaves
// the spare a spare. A start adopts what STORE/spares holds, and the worker retires spares of older
// generations (after a promotion or an import) and of projects gone.
const sparesDirName = "spares"

func (s *Store) sparesDir() string { return filepath.Join(s.storeDir, sparesDirName) }

// spare is one ready spare: its image, and the generation it was cloned from.
type spare struct {
	path    string
	project string
	gen     int
	genID   string
}

// spareSet is the spares the worker has made and mounted, by project; Create takes from it. Its
// lock guards ready alone and is never held across I/O or another lock; the worker's clone holds
// Store.gens (read) as a Create's does.
type spareSet struct {
	sync.Mutex
	ready map[string][]spare
	kick  chan struct{}
	stop  context.CancelFunc
	done  chan struct{}
}

// startSpares adopts the spares a previous run left and starts the worker that keeps
// Config.Spares of each block project's newest generation.
func (s *Store) startSpares() error {
	if s.cfg.Spares <= 0 && !exists(s.sparesDir()) {
		return nil
	}
	if err := os.MkdirAll(s.sparesDir(), 0o700); err != nil {
		return fmt.Errorf("create the spares directory: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s.spares = &spareSet{ready: map[string][]spare{}, kick: make(chan struct{}, 1), stop: cancel, done: make(chan struct{})}
	go s.spareWorker(ctx)
	return nil
}

// stopSpares stops the worker and waits for its pass to end.
func (s *Store) stopSpares() {
	if s.spares != nil {
		s.spares.stop()
		<-s.spares.done
	}
}

func (s *Store) kickSpares() {
	if s.spares != nil {
		select {
		case s.spares.kick <- struct{}{}:
		default:
		}
	}
}

func (s *Store) spareWorker(ctx context.Context) {
	defer close(s.spares.done)
	adopted := false
	for {
		if !adopted {
			adopted = s.adoptSpares(ctx) == nil
		}
		if adopted {
			s.restock(ctx)
		}
		select {
		case <-ctx.Done():
			return
		case <-s.spares.kick:
		case <-time.After(5 * time.Second):
		}
	}
}

// adoptSpares mounts and lists the spares a previous run made (a stop, a crash, a reboot).
func (s *Store) adoptSpares(ctx context.Context) error {
	entries, err := os.ReadDir(s.sparesDir())
	if err != nil {
		s.log.WithError(err).Warn("cannot list the spares; trying again in 5 s")
		return err
	}
	for _, e := range entries {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if isTemp(e.Name()) || !strings.HasSuffix(e.Name(), imgExt) {
			continue
		}
		p := filepath.Join(s.sparesDir(), e.Name())
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			continue
		}
		if st.Nlink > 1 {
			// A claim's rename that a crash left half-replayed (both names): the image is the
			// volume's, so only the spare's name goes, and nothing is unmounted.
			s.log.WithField("spare", p).Warn("a spare's image is also a volume's; deleting the spare's name")
			if err := s.removeFile(p); err != nil {
				s.log.WithError(err).WithField("spare", p).Warn("could not delete the spare's name")
			}
			continue
		}
		m, err := readMeta(p)
		if err != nil {
			s.retireSpare(spare{path: p}, "its attributes cannot be read: "+err.Error())
			continue
		}
		sp := spare{path: p, project: m[attrGolden], gen: m.int(attrGeneration), genID: m[attrSpareOf]}
		if err := s.mountSpare(ctx, sp); err != nil {
			s.retireSpare(sp, err.Error())
			continue
		}
		s.spares.Lock()
		s.spares.ready[sp.project] = append(s.spares.ready[sp.project], sp)
		s.spares.Unlock()
	}
	return nil
}

// restock makes each block project's spares of its newest generation up to Config.Spares, and
// retires the others. It never holds the spare set's lock across I/O.
func (s *Store) restock(ctx context.Context) {
	want := map[string]spare{} // by project: the generation its spares must be of
	entries, err := os.ReadDir(s.goldensDir())
	if err != nil {
		s.log.WithError(err).Warn("cannot list the goldens to make spares of")
		return
	}
	for _, e := range entries {
		if !e.IsDir() || driver.ValidateProject(e.Name()) != nil {
			continue
		}
		if g, id, ok := s.spareSource(e.Name()); ok {
			want[e.Name()] = spare{project: e.Name(), gen: g.Number, genID: id}
		}
	}
	var stale []spare
	have := map[string]int{}
	s.spares.Lock()
	for project, list := range s.spares.ready {
		w, ok := want[project]
		keep := list[:0]
		for _, sp := range list {
			if ok && sp.gen == w.gen && sp.genID == w.genID && s.cfg.Spares > have[project] {
				keep = append(keep, sp)
				have[project]++
			} else {
				stale = append(stale, sp)
			}
		}
		s.spares.ready[project] = keep
	}
	s.spares.Unlock()
	for _, sp := range stale {
		s.retireSpare(sp, "not of its project's newest generation, or more than --spares")
	}
	for project, w := range want {
		for n := have[project]; n < s.cfg.Spares && ctx.Err() == nil; n++ {
			sp, err := s.makeSpare(ctx, project)
			if err != nil {
				s.log.WithError(err).WithFields(logrus.Fields{"project": project, "generation": w.gen}).Warn("could not make a spare; trying again in 5 s")
				break
			}
			s.spares.Lock()
			s.spares.ready[project] = append(s.spares.ready[project], sp)
			s.spares.Unlock()
		}
	}
}

// spareSource is the generation a Create of project without options clones, and its image's
// identity (fileID); false when there is none to make spares of: no generation, a type=fs
// project, or a generation whose XFS still has to grow at its first mount.
func (s *Store) spareSource(project string) (*driver.Generation, string, bool) {
	p, err := s.readProject(project, false)
	if err != nil || p == nil || p.kind != driver.KindBlock || len(p.gens) == 0 {
		return nil, "", false
	}
	g := p.gens[len(p.gens)-1]
	m, err := readMeta(g.Source)
	if err != nil || m[attrGrow] == yes {
		return nil, "", false
	}
	id, err := fileID(g.Source)
	if err != nil {
		return nil, "", false
	}
	return &g, id, true
}

// fileID names the file at path for as long as it exists and after: its inode number with its
// birth time, or, where the filesystem keeps none, its modification time (a generation image is
// never written after its commit).
func fileID(path string) (string, error) {
	var stx unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, path, 0, unix.STATX_INO|unix.STATX_BTIME|unix.STATX_MTIME, &stx); err != nil {
		return "", err
	}
	t := stx.Mtime
	if stx.Mask&unix.STATX_BTIME != 0 {
		t = stx.Btime
	}
	return fmt.Sprintf("%d.%d.%d", stx.Ino, t.Sec, t.Nsec), nil
}

// makeSpare reflinks project's newest generation into a new spare and mounts it. It holds gens
// while it clones, as a Create does, so that the generation is not reclaimed from under it.
func (s *Store) makeSpare(ctx context.Context, project string) (spare, error) {
	s.gens.RLock()
	g, id, ok := s.spareSource(project)
	if !ok {
		s.gens.RUnlock()
		return spare{}, fmt.Errorf("golden %q has no generation to make spares of", project)
	}
	sp, err := s.cloneSpare(project, g, id)
	s.gens.RUnlock()
	if err != nil {
		return spare{}, err
	}
	if err := s.mountSpare(ctx, sp); err != nil {
		s.retireSpare(sp, "its mount failed")
		return spare{}, err
	}
	// A new spare mounted, not yet in the set. Only here: a start's adoption mounts spares too,
	// and the crash suite arms its faults through a restart.
	s.cfg.Faults.Hit("spare:after-mount")
	return sp, nil
}

func (s *Store) cloneSpare(project string, g *driver.Generation, genID string) (spare, error) {
	log := s.log.WithFields(logrus.Fields{"project": project, "generation": g.Number})
	src, err := os.Open(g.Source)
	if err != nil {
		return spare{}, mapErr(err)
	}
	defer src.Close()
	tmp, err := newTemp(s.sparesDir(), project)
	if err != nil {
		return spare{}, mapErr(err)
	}
	if err := xfsutil.Clone(tmp, src); err != nil {
		s.discard(log, tmp)
		return spare{}, mapErr(err)
	}
	s.cfg.Faults.Hit("spare:after-clone") // a temporary image in STORE/spares
	m := meta{attrKind: string(driver.KindBlock), attrGolden: project, attrGeneration: strconv.Itoa(g.Number),
		attrState: stateReady, attrSpareOf: genID}
	if err := setAttrs(tmp, m); err != nil {
		s.discard(log, tmp)
		return spare{}, mapErr(err)
	}
	final := filepath.Join(s.sparesDir(), project+"-"+strconv.FormatInt(time.Now().UnixNano(), 36)+imgExt)
	if err := commit(tmp, final); err != nil {
		s.discard(log, tmp)
		return spare{}, mapErr(err)
	}
	tmp.Close()
	log.WithField("spare", final).Debug("made a spare")
	return spare{path: final, project: project, gen: g.Number, genID: genID}, nil
}

// mountSpare mounts a spare's XFS at its kept mount, unless it is already there (adopted).
func (s *Store) mountSpare(ctx context.Context, sp spare) error {
	if kept, _, err := s.keptOf(sp.path); err != nil || kept != "" {
		return err
	}
	var st unix.Stat_t
	if err := unix.Stat(sp.path, &st); err != nil {
		return err
	}
	if err := s.releaseLoops(sp.path); err != nil {
		return err
	}
	opts := append([]string{"loop"}, xfsutil.MountOptions(s.cfg.Discard)...)
	if err := xfsutil.Mount(ctx, sp.path, s.keptPath(st.Ino), opts); err != nil {
		_ = os.Remove(s.keptPath(st.Ino))
		return fmt.Errorf("mount the spare %s: %w", sp.path, mapErr(err))
	}
	return nil
}

// retireSpare unmounts a spare and deletes it.
func (s *Store) retireSpare(sp spare, why string) {
	log := s.log.WithFields(logrus.Fields{"spare": sp.path, "project": sp.project, "generation": sp.gen, "why": why})
	if kept, _, err := s.keptOf(sp.path); err == nil && kept != "" {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		err := s.dropKept(ctx, kept)
		cancel()
		if err != nil {
			log.WithError(err).Warn("could not unmount a spare to retire it; trying again later")
			return
		}
	}
	if err := s.removeFile(sp.path); err != nil && !errors.Is(err, os.ErrNotExist) {
		log.WithError(err).Warn("could not delete a retired spare; the next start retires it")
		return
	}
	log.Debug("retired a spare")
}

// claimSpare makes the volume image img out of a ready spare of generation g of spec's golden,
// if there is one: true when it did. The caller holds gens, so g is the generation a Create
// would clone, and checks that spec takes no option a spare lacks.
func (s *Store) claimSpare(spec driver.Spec, g *driver.Generation, img string, log *logrus.Entry) (bool, error) {
	if s.spares == nil || spec.Size != 0 || spec.Kind != driver.KindBlock {
		return false, nil
	}
	id, err := fileID(g.Source)
	if err != nil {
		return false, nil
	}
	s.spares.Lock()
	list := s.spares.ready[spec.Golden]
	i := slices.IndexFunc(list, func(sp spare) bool { return sp.gen == g.Number && sp.genID == id })
	if i < 0 {
		s.spares.Unlock()
		return false, nil
	}
	sp := list[i]
	s.spares.ready[spec.Golden] = append(list[:i:i], list[i+1:]...)
	s.spares.Unlock()
	defer s.kickSpares()

	spareID, err := fileID(sp.path)
	if err != nil {
		s.retireSpare(sp, "it could not be read")
		return false, nil
	}
	t0 := time.Now()
	created := strconv.FormatInt(t0.Unix(), 10)
	if err := setAttr(sp.path, attrCreated, created); err != nil {
		s.retireSpare(sp, "its attributes could not be set")
		return false, nil
	}
	if err := unix.Renameat2(unix.AT_FDCWD, sp.path, unix.AT_FDCWD, img, unix.RENAME_NOREPLACE); err != nil {
		// Still a spare: back in the set for the next Create (its creation time is set anew then).
		s.spares.Lock()
		s.spares.ready[spec.Golden] = append(s.spares.ready[spec.Golden], sp)
		s.spares.Unlock()
		if errors.Is(err, unix.EEXIST) {
			return false, fmt.Errorf("%w: %s is already there", driver.ErrExists, img)
		}
		log.WithError(err).Warn("could not claim a spare; cloning instead")
		return false, nil
	}
	// The claim is durable once recorded (records.go); the directories' sync follows in the
	// background. Without the record, the sync of the volumes directory makes it durable: the
	// rename moved the entry from STORE/spares in the same transaction.
	t1 := time.Now()
	key := claimKey + spareID
	if err := s.putRecord(key, claimRecord{Name: spec.Name, Created: created}); err != nil {
		log.WithError(err).Warn("could not record the claim; syncing the volumes directory instead")
		if err := xfsutil.SyncDir(s.volumesDir()); err != nil {
			return false, err
		}
	} else {
		s.settle(key, "claim:after-rename")
	}
	s.cfg.Faults.Hit("create:after-claim")
	log.WithFields(logrus.Fields{"spare": sp.path, "rename_took": t1.Sub(t0).Round(time.Microsecond).String(),
		"record_took": time.Since(t1).Round(time.Microsecond).String()}).Debug("claimed a spare")
	return true, nil
}

// sparesReady counts the ready spares by project.
func (s *Store) sparesReady() map[string]int {
	out := map[string]int{}
	if s.spares == nil {
		return out
	}
	s.spares.Lock()
	defer s.spares.Unlock()
	for project, list := range s.spares.ready {
		if len(list) > 0 {
			out[project] = len(list)
		}
	}
	return out
}
