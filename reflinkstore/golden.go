package reflinkstore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/xfsutil"
)

// project is one directory goldens/PROJECT and its generation images.
type project struct {
	name      string
	dir       string
	kind      driver.Kind
	gens      []driver.Generation // complete generations, oldest first
	lastGen   int                 // highest number handed out, from attrLastGen
	maxTemp   int                 // highest number of a temporary generation image
	importing bool                // an import's temporary image is there
}

// maxGeneration is the highest generation number ever handed out in the project, so that numbers
// only grow: a deleted generation's number is never reused for different content.
func (p *project) maxGeneration() int {
	n := max(p.lastGen, p.maxTemp)
	if len(p.gens) > 0 {
		n = max(n, p.gens[len(p.gens)-1].Number)
	}
	return n
}

// readProject reads one project, or returns nil when it does not exist. withUsage adds each
// generation's FIEMAP accounting, which costs a walk of its extents.
func (s *Store) readProject(name string, withUsage bool) (*project, error) {
	dir, err := s.projectDir(name)
	if err != nil {
		return nil, err
	}
	fi, err := os.Lstat(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("%s is not a directory; zgolden did not make it, so remove it by hand", dir)
	}
	// Listings take no lock: a project, generation or volume can be removed between reading a
	// directory and reading its entries' attributes. What vanished no longer exists, so it is
	// left out rather than failing the whole listing (and with it golden ls, Reclaim, or the
	// reply of a Promote that succeeded).
	dm, err := readMeta(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	p := &project{name: name, dir: dir, kind: driver.KindOf(dm[attrKind]), lastGen: dm.int(attrLastGen)}
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	for _, e := range entries {
		path := filepath.Join(dir, e.Name())
		if !e.Type().IsRegular() {
			continue
		}
		if isTemp(e.Name()) {
			if n, ok := tempGeneration(e.Name()); ok {
				p.maxTemp = max(p.maxTemp, n)
			}
			if m, err := readMeta(path); err == nil && m[attrState] == stateImporting {
				p.importing = true
			}
			continue
		}
		n, ok := parseGen(e.Name())
		if !ok {
			continue
		}
		m, err := readMeta(path)
		if errors.Is(err, os.ErrNotExist) {
			continue // reclaimed meanwhile (see above)
		}
		if err != nil {
			return nil, err
		}
		if m[attrState] != stateReady {
			continue // not made by zgolden: images only get this name complete
		}
		g := driver.Generation{
			Project: name, Number: n, Kind: p.kind, CreatedAt: m.time(attrCreated),
			Source: path, FromVolume: m[attrFrom], GUID: m[attrGUID],
		}
		if withUsage {
			if f, err := os.Open(path); err == nil {
				if ext, err := xfsutil.FileExtents(f); err == nil {
					g.Used, g.Referenced = ext.Exclusive(), ext.Allocated
				}
				f.Close()
			}
		}
		p.gens = append(p.gens, g)
	}
	sort.Slice(p.gens, func(i, j int) bool { return p.gens[i].Number < p.gens[j].Number })
	return p, nil
}

// projects reads every project.
func (s *Store) projects(withUsage bool) ([]*project, error) {
	entries, err := os.ReadDir(s.goldensDir())
	if err != nil {
		return nil, err
	}
	var out []*project
	for _, e := range entries {
		if !e.IsDir() || driver.ValidateProject(e.Name()) != nil {
			continue
		}
		p, err := s.readProject(e.Name(), withUsage)
		if err != nil {
			return nil, err
		}
		if p != nil {
			out = append(out, p)
		}
	}
	return out, nil
}

// dependents maps project and generation to the volumes cloned from it, from the volumes'
// attributes: reflinks themselves record no origin.
func (s *Store) dependents() (map[string]map[int][]string, error) {
	entries, err := os.ReadDir(s.volumesDir())
	if err != nil {
		return nil, err
	}
	deps := map[string]map[int][]string{}
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), imgExt)
		if !ok || isTemp(e.Name()) || driver.ValidateName(name) != nil {
			continue
		}
		m, err := readMeta(filepath.Join(s.volumesDir(), e.Name()))
		if errors.Is(err, os.ErrNotExist) {
			continue // removed since the directory was read: no longer a dependent
		}
		if err != nil {
			return nil, err
		}
		n := m.int(attrGeneration)
		if m[attrState] != stateReady || m[attrGolden] == "" || n == 0 {
			continue
		}
		if deps[m[attrGolden]] == nil {
			deps[m[attrGolden]] = map[int][]string{}
		}
		deps[m[attrGolden]][n] = append(deps[m[attrGolden]][n], name)
	}
	return deps, nil
}

// Goldens implements driver.Backend.
func (s *Store) Goldens(ctx context.Context) ([]driver.Golden, error) {
	ps, err := s.projects(true)
	if err != nil {
		return nil, err
	}
	deps, err := s.dependents()
	if err != nil {
		return nil, err
	}
	out := make([]driver.Golden, 0, len(ps))
	for _, p := range ps {
		for i := range p.gens {
			p.gens[i].Dependents = deps[p.name][p.gens[i].Number]
		}
		out = append(out, driver.Golden{Project: p.name, Kind: p.kind, Generations: p.gens, Importing: p.importing})
	}
	return out, nil
}

// pickGeneration returns the generation spec clones by driver.PickGeneration: nil, nil for a
// cold start.
func (s *Store) pickGeneration(spec driver.Spec) (*driver.Generation, error) {
	p, err := s.readProject(spec.Golden, false)
	if err != nil {
		return nil, err
	}
	if p == nil {
		return driver.PickGeneration(spec, "", nil)
	}
	return driver.PickGeneration(spec, p.kind, p.gens)
}

// ensureProject returns the project, creating its directory if needed; created says whether it did.
func (s *Store) ensureProject(name string, kind driver.Kind) (p *project, created bool, err error) {
	p, err = s.readProject(name, false)
	if err != nil {
		return nil, false, err
	}
	if p != nil {
		if p.kind != kind {
			return nil, false, driver.KindMismatchError(name, p.kind, kind)
		}
		return p, false, nil
	}
	dir, err := s.projectDir(name)
	if err != nil {
		return nil, false, err
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		return nil, false, mapErr(err)
	}
	if err := setAttr(dir, attrKind, string(kind)); err != nil {
		s.removeProjectDir(dir)
		return nil, false, err
	}
	return &project{name: name, dir: dir, kind: kind}, true, xfsutil.SyncDir(s.goldensDir())
}

// removeProjectDir deletes a project directory that a failed Promote or Import created, if it is
// still empty.
func (s *Store) removeProjectDir(dir string) {
	if err := s.checkInside(dir); err == nil {
		_ = os.Remove(dir) // fails, harmlessly, when anything is in it
	}
}

// reserveGeneration hands out the project's next generation number and records it on the project
// directory before anything is made, so a number is never used twice even if its generation is
// later deleted or never completes.
func (s *Store) reserveGeneration(p *project) (int, error) {
	n := p.maxGeneration() + 1
	if err := setAttr(p.dir, attrLastGen, strconv.Itoa(n)); err != nil {
		return 0, err
	}
	p.lastGen = n
	return n, nil
}

// Promote implements driver.Backend: the volume's image is reflinked to a temporary generation
// image and renamed into place. A reflink copies no dependency, so the generation never pins the
// volume and the volume can be removed at once (no clone chains, docs/design-facts.md, "Clone chains").
func (s *Store) Promote(ctx context.Context, v driver.Volume, mountpoint, projectName string) (driver.Generation, error) {
	defer s.kickSpares() // a new newest generation, or one gone: the spares follow (spares.go)
	img, err := s.volumeImage(v.Name)
	if err != nil {
		return driver.Generation{}, err
	}
	if err := driver.ValidateProject(projectName); err != nil {
		return driver.Generation{}, err
	}
	src, err := os.Open(img)
	if err != nil {
		return driver.Generation{}, fmt.Errorf("image of volume %q: %w", v.Name, mapErr(err))
	}
	defer src.Close()
	vm, err := readMeta(img)
	if err != nil {
		return driver.Generation{}, err
	}
	p, created, err := s.ensureProject(projectName, v.Kind)
	if err != nil {
		return driver.Generation{}, err
	}
	n, err := s.reserveGeneration(p)
	if err != nil {
		return driver.Generation{}, err
	}
	log := s.log.WithFields(logrus.Fields{"volume": v.Name, "image": img, "project": projectName, "generation": n})
	fail := func(tmp *os.File, err error) (driver.Generation, error) {
		if tmp != nil {
			s.discard(log, tmp)
		}
		if created {
			s.removeProjectDir(p.dir)
		}
		return driver.Generation{}, err
	}
	tmp, err := newTemp(p.dir, genPrefix+strconv.Itoa(n))
	if err != nil {
		return fail(nil, mapErr(err))
	}
	if err := s.cloneConsistent(ctx, tmp, src, img, mountpoint); err != nil {
		return fail(tmp, err)
	}
	s.cfg.Faults.Hit("promote:after-copy") // the reflink is the snapshot and the copy at once
	m := meta{
		attrKind: string(v.Kind), attrState: stateReady, attrFrom: v.Name,
		attrCreated: strconv.FormatInt(time.Now().Unix(), 10),
	}
	if vm[attrGrow] == yes { // never mounted since it was grown: its clones must grow the XFS
		m[attrGrow] = yes
	}
	if err := setAttrs(tmp, m); err != nil {
		return fail(tmp, mapErr(err))
	}
	if err := commit(tmp, genImage(p.dir, n)); err != nil {
		return fail(tmp, mapErr(err))
	}
	tmp.Close()
	log.WithField("frozen", mountpoint != "").Info("promote: reflinked the volume into a new generation")
	return s.generation(projectName, n)
}

// cloneConsistent reflinks src, the image img, into dst, frozen when the volume's XFS is mounted
// (xfsutil.Frozen): at mountpoint, Docker's, or else at its kept mount, where what the container
// wrote before its Unmount may still be in the page cache (kept.go). Freezing flushes the XFS
// through its loop device into the image's page cache, and FICLONE writes the image's dirty
// pages back before sharing its extents.
func (s *Store) cloneConsistent(ctx context.Context, dst, src *os.File, img, mountpoint string) error {
	if mountpoint == "" {
		kept, _, err := s.keptOf(img)
		if err != nil {
			return mapErr(err)
		}
		mountpoint = kept
	}
	return mapErr(xfsutil.Frozen(ctx, mountpoint, func() error { return xfsutil.Clone(dst, src) }))
}

// generation returns one complete generation with its usage and dependents.
func (s *Store) generation(projectName string, n int) (driver.Generation, error) {
	p, err := s.readProject(projectName, true)
	if err != nil {
		return driver.Generation{}, err
	}
	if p != nil {
		for _, g := range p.gens {
			if g.Number == n {
				deps, err := s.dependents()
				if err != nil {
					return driver.Generation{}, err
				}
				g.Dependents = deps[projectName][n]
				return g, nil
			}
		}
	}
	return driver.Generation{}, driver.VanishedError(projectName, n)
}

// BeginGeneration implements driver.Backend: a new temporary image, marked importing,
// formatted and mounted in the work directory. Until Commit sets the completion marker
// (state=ready), a crash leaves a temporary image that Load wipes.
func (s *Store) BeginGeneration(ctx context.Context, projectName string, kind driver.Kind, size uint64, from string) (driver.GenerationWriter, error) {
	if err := driver.ValidateProject(projectName); err != nil {
		return nil, err
	}
	p, created, err := s.ensureProject(projectName, kind)
	if err != nil {
		return nil, err
	}
	n, err := s.reserveGeneration(p)
	if err != nil {
		return nil, err
	}
	tmp, err := newTemp(p.dir, genPrefix+strconv.Itoa(n))
	if err != nil {
		if created {
			s.removeProjectDir(p.dir)
		}
		return nil, mapErr(err)
	}
	w := &genWriter{s: s, p: p, created: created, n: n, tmp: tmp,
		dir: filepath.Join(s.cfg.WorkDir, "import-"+projectName+"-"+strconv.Itoa(n)),
		log: s.log.WithFields(logrus.Fields{"project": projectName, "image": tmp.Name(), "generation": n})}
	// Marked importing first, so golden ls shows the import while it runs.
	err = setAttrs(tmp, meta{
		attrKind: string(kind), attrState: stateImporting, attrFrom: from,
		attrCreated: strconv.FormatInt(time.Now().Unix(), 10),
	})
	if err != nil {
		return nil, w.fail(mapErr(err))
	}
	// Room for the tree twice over (XFS metadata, and growth in later generations); sparse, so
	// only what is written is allocated.
	if err := s.format(ctx, tmp, max(s.cfg.DefaultSize, roundUp(size*2, 1<<30))); err != nil {
		return nil, w.fail(err)
	}
	s.cfg.Faults.Hit("import:after-create")
	if err := xfsutil.Mount(ctx, tmp.Name(), w.dir, []string{"loop", "nouuid"}); err != nil {
		if rerr := s.releaseLoops(tmp.Name()); rerr != nil {
			w.log.WithError(rerr).Error("could not detach the loop device after a failed mount")
		}
		_ = os.Remove(w.dir)
		return nil, w.fail(mapErr(err))
	}
	return w, nil
}

// genWriter is the reflink store's driver.GenerationWriter: a temporary image, loop-mounted at dir.
type genWriter struct {
	s       *Store
	p       *project
	created bool // BeginGeneration made the project directory
	n       int
	tmp     *os.File
	dir     string
	log     *logrus.Entry
}

func (w *genWriter) Number() int { return w.n }
func (w *genWriter) Dir() string { return w.dir }

// fail deletes the temporary image, and the project directory if BeginGeneration made it.
func (w *genWriter) fail(err error) error {
	w.s.discard(w.log, w.tmp)
	if w.created {
		w.s.removeProjectDir(w.p.dir)
	}
	return err
}

// unmount unmounts the image and detaches its loop device. An image that stays mounted is kept:
// deleting it would leave a mounted, deleted image. Load unmounts the work directory and deletes
// the temporary image at the next start.
func (w *genWriter) unmount(ctx context.Context) error {
	uctx, cancel := bounded(ctx, time.Minute)
	defer cancel()
	if err := xfsutil.UnmountRetry(uctx, w.dir, 10); err != nil {
		w.tmp.Close()
		w.log.WithError(err).Error("could not unmount the import; it is cleaned up at the next start")
		return mapErr(err)
	}
	_ = os.Remove(w.dir)
	if err := w.s.releaseLoops(w.tmp.Name()); err != nil {
		w.log.WithError(err).Error("could not detach the import's loop device")
	}
	return nil
}

// Abort implements driver.GenerationWriter.
func (w *genWriter) Abort(ctx context.Context) {
	if w.unmount(ctx) == nil {
		_ = w.fail(nil)
	}
}

// Commit implements driver.GenerationWriter: unmount, compact, set the completion marker and
// rename the image into place.
func (w *genWriter) Commit(ctx context.Context, phase func(string)) (driver.Generation, error) {
	defer w.s.kickSpares() // the project has a new newest generation (spares.go)
	if err := w.unmount(ctx); err != nil {
		return driver.Generation{}, err
	}
	// Loop writeback left the image in thousands of small extents, and every clone's FICLONE
	// costs time in proportion to them: rewrite it once, compactly, so clones stay O(1).
	phase("compacting")
	if err := w.s.compact(ctx, w.log, w.p.dir, genPrefix+strconv.Itoa(w.n), &w.tmp); err != nil {
		return driver.Generation{}, w.fail(err)
	}
	w.s.cfg.Faults.Hit("import:after-copy")
	// The completion marker: from here a crash rolls forward (see cleanTemps).
	if err := setAttrs(w.tmp, meta{attrState: stateReady}); err != nil {
		return driver.Generation{}, w.fail(mapErr(err))
	}
	w.s.cfg.Faults.Hit("import:after-marker")
	if err := commit(w.tmp, genImage(w.p.dir, w.n)); err != nil {
		return driver.Generation{}, w.fail(mapErr(err))
	}
	w.tmp.Close()
	return w.s.generation(w.p.name, w.n)
}

// OwnDirs implements driver.Backend: the store's root holds every image, the store file
// included, so an import from it would copy the store into itself.
func (s *Store) OwnDirs() map[string]string {
	return map[string]string{s.cfg.Root: "the reflink store's root"}
}

// RemoveGeneration implements driver.Backend.
func (s *Store) RemoveGeneration(ctx context.Context, projectName string, n int) error {
	defer s.kickSpares() // a new newest generation, or one gone: the spares follow (spares.go)
	s.gens.Lock()
	defer s.gens.Unlock()
	p, err := s.readProject(projectName, false)
	if err != nil {
		return err
	}
	if p == nil {
		return driver.GoldenMissingError(projectName)
	}
	for _, g := range p.gens {
		if g.Number != n {
			continue
		}
		deps, err := s.dependents()
		if err != nil {
			return err
		}
		if d := deps[projectName][n]; len(d) > 0 {
			return driver.InUseError(projectName, n, d)
		}
		if err := s.removeFile(g.Source); err != nil {
			return err
		}
		s.log.WithFields(logrus.Fields{"project": projectName, "generation": n, "image": g.Source}).Info("generation removed")
		return xfsutil.SyncDir(p.dir)
	}
	return driver.GenerationMissingError(projectName, n)
}

// RemoveGolden implements driver.Backend.
func (s *Store) RemoveGolden(ctx context.Context, projectName string) error {
	defer s.kickSpares() // a new newest generation, or one gone: the spares follow (spares.go)
	s.gens.Lock()
	defer s.gens.Unlock()
	p, err := s.readProject(projectName, false)
	if err != nil {
		return err
	}
	if p == nil {
		return driver.GoldenMissingError(projectName)
	}
	deps, err := s.dependents()
	if err != nil {
		return err
	}
	var names []string
	for _, d := range deps[projectName] {
		names = append(names, d...)
	}
	if len(names) > 0 {
		sort.Strings(names)
		return driver.DependentsError(names)
	}
	// An import's image is attached while it copies; the driver refuses RemoveGolden during its
	// own imports, so this only catches one from elsewhere.
	if loops, err := s.loopsUnder(p.dir); err != nil {
		return err
	} else if len(loops) > 0 {
		return fmt.Errorf("%w: %s is attached to %s; wait for the import to finish", driver.ErrBusy, loops[0].BackingFile, loops[0].Device)
	}
	if err := s.checkInside(p.dir); err != nil {
		return err
	}
	if err := os.RemoveAll(p.dir); err != nil {
		return mapErr(err)
	}
	return xfsutil.SyncDir(s.goldensDir())
}

// compact replaces the temporary image *tmp with a compact copy of it (xfsutil.CopyCompact),
// another temporary image with the same attributes: a crash meanwhile leaves two temporary
// images, neither marked ready, which Load deletes.
func (s *Store) compact(ctx context.Context, log *logrus.Entry, dir, base string, tmp **os.File) error {
	m, err := readMeta((*tmp).Name())
	if err != nil {
		return err
	}
	c, err := newTemp(dir, base)
	if err != nil {
		return mapErr(err)
	}
	if err := setAttrs(c, m); err != nil {
		s.discard(log, c)
		return mapErr(err)
	}
	t0 := time.Now()
	if err := xfsutil.CopyCompact(ctx, c, *tmp); err != nil {
		s.discard(log, c)
		return mapErr(err)
	}
	old := *tmp
	*tmp = c
	old.Close()
	if err := s.removeFile(old.Name()); err != nil {
		log.WithError(err).WithField("temp", old.Name()).Warn("could not delete the uncompacted image; it is deleted at the next start")
	}
	log.WithField("took", time.Since(t0).Round(time.Millisecond).String()).Info("golden image compacted")
	return nil
}
