package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/zgolden/zgolden/xfsutil"
)

// importState tracks one running import so Creates for its project can wait for it.
type importState struct {
	done     chan struct{}
	progress Progress
	started  time.Time
}

// waitImport blocks a Create for project while that project's golden is being imported, for at
// most ImportWait, so the Create then gets an instant clone instead of a cold start. A Create must
// answer Docker within 2 minutes, so a longer import gets a retryable error naming the progress.
func (d *Driver) waitImport(ctx context.Context, project string) error {
	d.mu.Lock()
	st, ok := d.imports[project]
	d.mu.Unlock()
	if !ok {
		return nil
	}
	timer := time.NewTimer(d.cfg.ImportWait)
	defer timer.Stop()
	select {
	case <-st.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-timer.C:
		d.mu.Lock()
		p := st.progress
		d.mu.Unlock()
		return fmt.Errorf("golden %q: %w (%s, running for %s); retry the create in a minute, or create without -o golden",
			project, ErrImportRunning, p.String(), time.Since(st.started).Round(time.Second))
	}
}

// String says how far an import is, for errors and `zgolden status`.
func (p Progress) String() string {
	if p.BytesTotal > 0 {
		return fmt.Sprintf("%s: %d%% of %d files copied", p.Phase, p.BytesDone*100/p.BytesTotal, p.FilesTotal)
	}
	return p.Phase
}

// ImportOptions tunes an import.
type ImportOptions struct {
	// RemoveSource deletes the source directory once the copy has been verified and snapshotted.
	RemoveSource bool
}

// Import seeds project's next generation from the directory src. Creates for the project wait for
// it (see waitImport); Creates for other projects are never blocked.
func (d *Driver) Import(ctx context.Context, project string, kind Kind, src string, opts ImportOptions, progress func(Progress)) (Generation, error) {
	if err := ValidateProject(project); err != nil {
		return Generation{}, err
	}
	if kind != "" && kind != KindBlock && kind != KindFS {
		return Generation{}, invalidf("type must be block or fs, not %q", kind)
	}
	if err := d.checkImportSource(src); err != nil {
		return Generation{}, err
	}
	st, ok := d.beginImport(project)
	if !ok {
		return Generation{}, fmt.Errorf("golden %q: %w; wait for it to finish", project, ErrImportRunning)
	}
	return d.runImport(ctx, st, project, kind, src, opts, progress)
}

// checkImportSource refuses sources that are not absolute directories, or that hold zgolden's own
// mounts or state: an import with RemoveSource must never be able to delete those.
func (d *Driver) checkImportSource(src string) error {
	if !filepath.IsAbs(src) || filepath.Clean(src) == "/" {
		return invalidf("import source %q must be an absolute path to a directory other than /", src)
	}
	clean := filepath.Clean(src)
	if err := d.checkOverlap(src, clean); err != nil {
		return err
	}
	fi, err := os.Stat(clean)
	if err != nil || !fi.IsDir() {
		return invalidf("import source %q is not a directory", src)
	}
	// Through symlinks too: a link into the store would copy the very image being written, and
	// --remove-source would then delete every volume and golden.
	real, err := filepath.EvalSymlinks(clean)
	if err != nil {
		return invalidf("import source %q: %v", src, err)
	}
	if err := d.checkOverlap(src, real); err != nil {
		return err
	}
	return nil
}

// checkOverlap refuses path (the import source src, resolved or not) when it holds, or lies in,
// the mount root, the state directory or a directory the backend keeps data in.
func (d *Driver) checkOverlap(src, path string) error {
	own := map[string]string{d.cfg.MountRoot: "zgolden's own directory", d.cfg.StateDir: "zgolden's own directory"}
	for dir, what := range d.backend.OwnDirs() {
		own[dir] = what
	}
	dirs := make([]string, 0, len(own))
	for dir := range own {
		dirs = append(dirs, dir)
	}
	sort.Strings(dirs)
	for _, dir := range dirs {
		if dir == "" {
			continue
		}
		if path == dir || strings.HasPrefix(dir, path+"/") || strings.HasPrefix(path, dir+"/") {
			return invalidf("import source %q overlaps %s %s, which holds volumes or goldens; import a directory outside it", src, own[dir], dir)
		}
	}
	return nil
}

// beginImport registers a running import of project, so Creates wait for it; false if one runs.
func (d *Driver) beginImport(project string) (*importState, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, running := d.imports[project]; running {
		return nil, false
	}
	st := &importState{done: make(chan struct{}), started: time.Now(), progress: Progress{Phase: "waiting for the project lock"}}
	d.imports[project] = st
	return st, true
}

func (d *Driver) runImport(ctx context.Context, st *importState, project string, kind Kind, src string, opts ImportOptions, progress func(Progress)) (Generation, error) {
	defer func() {
		d.mu.Lock()
		delete(d.imports, project)
		d.mu.Unlock()
		close(st.done)
	}()
	if kind == "" {
		kind = KindBlock
	}
	d.projects.Lock(project)
	defer d.projects.Unlock(project)
	if err := d.checkReserve(ctx, "importing golden "+strconv.Quote(project)); err != nil {
		return Generation{}, err
	}

	log := d.log.WithFields(logrus.Fields{"project": project, "src": src})
	log.Info("golden import started")
	gen, err := ImportTree(ctx, d.backend, project, kind, src, func(p Progress) {
		d.mu.Lock()
		st.progress = p
		d.mu.Unlock()
		if progress != nil {
			progress(p)
		}
	})
	if err != nil {
		return Generation{}, fmt.Errorf("import %s as golden %q: %w", src, project, err)
	}
	d.cfg.Faults.Hit("import:before-reply")
	log.WithFields(logrus.Fields{"generation": gen.Number, "took": time.Since(st.started).Round(time.Millisecond).String()}).Info("golden import finished")
	if opts.RemoveSource {
		// ImportTree verified the copy entry by entry before the generation was committed.
		if err := os.RemoveAll(src); err != nil {
			return gen, fmt.Errorf("golden %q generation %d is ready, but removing the source %s failed: %w", project, gen.Number, src, err)
		}
		log.Info("removed the imported source directory")
	}
	return gen, nil
}

// ImportTree is the one import pipeline of every backend: scan src, have b begin an empty
// generation sized for it, copy with cp -a semantics and verify entry by entry
// (xfsutil.CopyTree), flush, and commit; any failure aborts the generation. The caller holds the
// project (Driver.Import does, with the project lock); report must not be nil.
func ImportTree(ctx context.Context, b Backend, project string, kind Kind, src string, report func(Progress)) (Generation, error) {
	if gs, err := b.Goldens(ctx); err == nil {
		for _, g := range gs {
			if g.Project == project && g.Kind != "" && g.Kind != kind {
				return Generation{}, KindMismatchError(project, g.Kind, kind)
			}
		}
	}
	report(Progress{Phase: "scanning"})
	size, err := xfsutil.Scan(ctx, src)
	if err != nil {
		return Generation{}, fmt.Errorf("scan %s: %w", src, err)
	}
	at := func(phase string, files, bytes int64) Progress {
		return Progress{Phase: phase, FilesDone: files, FilesTotal: size.Files, BytesDone: bytes, BytesTotal: size.Bytes}
	}
	report(at("formatting", 0, 0))
	w, err := b.BeginGeneration(ctx, project, kind, uint64(size.Bytes), "import:"+src)
	if err != nil {
		return Generation{}, err
	}
	err = xfsutil.CopyTree(ctx, src, w.Dir(), func(files, bytes int64) { report(at("copying", files, bytes)) })
	if err == nil {
		report(at("syncing", size.Files, size.Bytes))
		err = xfsutil.Sync(w.Dir())
	}
	if err != nil {
		w.Abort(ctx)
		return Generation{}, copyError(ctx, b, err)
	}
	gen, err := w.Commit(ctx, func(phase string) { report(at(phase, size.Files, size.Bytes)) })
	if err != nil {
		return Generation{}, err
	}
	report(at("done", size.Files, size.Bytes))
	return gen, nil
}

// copyError marks a failed copy ErrNoSpace when space ran out. A copy that fails because the
// backend is full often shows up as an I/O error inside the generation's XFS, not as ENOSPC, so
// the backend's free space decides too.
func copyError(ctx context.Context, b Backend, err error) error {
	if errors.Is(err, ErrNoSpace) {
		return err
	}
	full := errors.Is(err, xfsutil.ErrNoSpace) || errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT)
	free := ""
	if sp, serr := b.Space(ctx); serr == nil && sp.Available < 64<<20 {
		full, free = true, fmt.Sprintf(" (only %d bytes are free)", sp.Available)
	}
	if !full {
		return err
	}
	return fmt.Errorf("%w: %v%s; remove unused volumes, reclaim old golden generations, or give the %s backend more room (see `zgolden status`)", ErrNoSpace, err, free, b.Name())
}

// autoImport starts a background import of project from the legacy golden directory configured
// by Config.LegacyGoldens, if there is one. It reports whether an import is now running.
func (d *Driver) autoImport(project string, kind Kind) bool {
	if d.cfg.LegacyGoldens == "" {
		return false
	}
	src := strings.ReplaceAll(d.cfg.LegacyGoldens, "{project}", project)
	if d.checkImportSource(src) != nil {
		return false
	}
	st, ok := d.beginImport(project)
	if !ok {
		return true // one is already running
	}
	d.log.WithFields(logrus.Fields{"project": project, "src": src}).Info("no golden yet, but a legacy golden directory exists: importing it in the background")
	go func() {
		// Not tied to the Create that started it: the import outlives Docker's 2-minute call.
		_, err := d.runImport(context.Background(), st, project, kind, src, ImportOptions{RemoveSource: d.cfg.LegacyRemove}, nil)
		if err != nil {
			d.log.WithError(err).WithField("project", project).Error("background import of the legacy golden failed; the next Create retries it")
		}
	}()
	return true
}

// ImportProgress returns the progress of a running import of project, if there is one.
func (d *Driver) ImportProgress(project string) (Progress, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	st, ok := d.imports[project]
	if !ok {
		return Progress{}, false
	}
	return st.progress, true
}

// Promote makes the volume's current content project's next generation. A mounted volume is
// frozen (sync + xfs_freeze) for the instant of the snapshot, so the generation is
// crash-consistent; stop any Docker daemon inside the volume first for a clean Docker state.
func (d *Driver) Promote(ctx context.Context, volume, project string) (Generation, error) {
	if err := ValidateName(volume); err != nil {
		return Generation{}, err
	}
	if err := ValidateProject(project); err != nil {
		return Generation{}, err
	}
	d.locks.Lock(volume)
	defer d.locks.Unlock(volume)
	d.projects.Lock(project)
	defer d.projects.Unlock(project)
	if _, running := d.ImportProgress(project); running {
		return Generation{}, fmt.Errorf("golden %q: %w; wait for it to finish", project, ErrImportRunning)
	}
	if err := d.checkReserve(ctx, "promoting "+strconv.Quote(volume)); err != nil {
		return Generation{}, err
	}
	st, ok := d.lookup(volume)
	if !ok {
		return Generation{}, notFound(volume)
	}
	mountpoint := ""
	mounted, err := d.backend.Mounted(d.mountpoint(volume))
	if err != nil {
		return Generation{}, err
	}
	if mounted {
		mountpoint = d.mountpoint(volume)
	}
	start := time.Now()
	gen, err := d.backend.Promote(ctx, st.Volume, mountpoint, project)
	if err != nil {
		return Generation{}, fmt.Errorf("promote volume %q to golden %q: %w", volume, project, err)
	}
	d.cfg.Faults.Hit("promote:before-reply")
	d.log.WithFields(logrus.Fields{
		"volume": volume, "project": project, "generation": gen.Number, "frozen": mounted,
		"took": time.Since(start).Round(time.Millisecond).String(),
	}).Info("volume promoted to a golden generation")
	return gen, nil
}

// Goldens lists every project's golden, marking projects whose import is running.
func (d *Driver) Goldens(ctx context.Context) ([]Golden, error) {
	gs, err := d.backend.Goldens(ctx)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	for i := range gs {
		if _, ok := d.imports[gs[i].Project]; ok {
			gs[i].Importing = true
		}
	}
	d.mu.Unlock()
	sort.Slice(gs, func(i, j int) bool { return gs[i].Project < gs[j].Project })
	return gs, nil
}

// PromoteAndReclaim is Promote followed by the automatic reclaim: generations of project older
// than the newest keep that no volume uses are destroyed (keep 0: none). A reclaim that fails is
// logged and retried at the next promotion; the promotion itself stands.
func (d *Driver) PromoteAndReclaim(ctx context.Context, volume, project string, keep int) (Generation, []Generation, error) {
	gen, err := d.Promote(ctx, volume, project)
	if err != nil || keep <= 0 {
		return gen, nil, err
	}
	reclaimed, err := d.Reclaim(ctx, project, keep)
	if err != nil {
		d.log.WithError(err).WithField("project", project).Warn("automatic reclaim after promote failed; it is retried at the next promotion")
	}
	return gen, reclaimed, nil
}

// Reclaim destroys the generations of project (or of every project, if project is "") that are
// older than the newest keep generations and that no volume depends on. A generation in use is
// never destroyed. It returns the generations it destroyed.
func (d *Driver) Reclaim(ctx context.Context, project string, keep int) ([]Generation, error) {
	if keep < 1 {
		keep = 1 // the newest generation is what new volumes clone: never reclaim it
	}
	if project != "" {
		if err := ValidateProject(project); err != nil {
			return nil, err
		}
	}
	gs, err := d.backend.Goldens(ctx)
	if err != nil {
		return nil, err
	}
	var removed []Generation
	for _, g := range gs {
		if project != "" && g.Project != project {
			continue
		}
		r, err := d.reclaimProject(ctx, g.Project, keep)
		removed = append(removed, r...)
		if err != nil {
			return removed, err
		}
	}
	return removed, nil
}

func (d *Driver) reclaimProject(ctx context.Context, project string, keep int) ([]Generation, error) {
	d.projects.Lock(project)
	defer d.projects.Unlock(project)
	gs, err := d.backend.Goldens(ctx) // re-read under the project lock
	if err != nil {
		return nil, err
	}
	var removed []Generation
	for _, g := range gs {
		if g.Project != project {
			continue
		}
		for i, gen := range g.Generations {
			if i >= len(g.Generations)-keep || len(gen.Dependents) > 0 {
				continue
			}
			err := d.backend.RemoveGeneration(ctx, project, gen.Number)
			if errors.Is(err, ErrGenerationInUse) {
				continue // a Create cloned it after we listed it: it is in use now, which is fine
			}
			if err != nil {
				return removed, fmt.Errorf("reclaim generation %d of golden %q: %w", gen.Number, project, err)
			}
			d.log.WithFields(logrus.Fields{"project": project, "generation": gen.Number, "bytes": gen.Used}).Info("reclaimed unused golden generation")
			removed = append(removed, gen)
		}
	}
	return removed, nil
}

// RemoveGolden destroys project's golden. It refuses while volumes depend on any generation,
// unless force is set: then those volumes are removed first (refused if any is mounted).
func (d *Driver) RemoveGolden(ctx context.Context, project string, force bool) error {
	if err := ValidateProject(project); err != nil {
		return err
	}
	if force {
		// Volumes are removed before the project lock is taken: the lock order is a volume's
		// lock before a project's, never the reverse.
		gs, err := d.backend.Goldens(ctx)
		if err != nil {
			return err
		}
		for _, g := range gs {
			if g.Project != project {
				continue
			}
			for _, gen := range g.Generations {
				for _, v := range gen.Dependents {
					if err := d.Remove(ctx, v); err != nil {
						return fmt.Errorf("remove golden %q --force: %w", project, err)
					}
				}
			}
		}
	}
	d.projects.Lock(project)
	defer d.projects.Unlock(project)
	if _, running := d.ImportProgress(project); running {
		return fmt.Errorf("golden %q: %w; wait for it to finish", project, ErrImportRunning)
	}
	if err := d.backend.RemoveGolden(ctx, project); err != nil {
		if errors.Is(err, ErrHasDependents) {
			err = fmt.Errorf("%w (or pass --force to remove those volumes too)", err)
		}
		return fmt.Errorf("remove golden %q: %w", project, err)
	}
	d.log.WithFields(logrus.Fields{"project": project, "force": force}).Info("golden removed")
	return nil
}

// Status reports the backend's state and the driver's counts, for `zgolden status`.
func (d *Driver) Status(ctx context.Context) (Status, error) {
	st, err := d.backend.Status(ctx)
	if err != nil {
		return Status{}, err
	}
	vols := d.List()
	st.Backend, st.Volumes, st.Mounted, st.MountRoot = d.backend.Name(), len(vols), 0, d.cfg.MountRoot
	for _, v := range vols {
		if v.Mounts > 0 {
			st.Mounted++
		}
	}
	d.mu.Lock()
	for p, s := range d.imports {
		if st.Imports == nil {
			st.Imports = map[string]Progress{}
		}
		st.Imports[p] = s.progress
	}
	d.mu.Unlock()
	return st, nil
}
