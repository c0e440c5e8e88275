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
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/xfsutil"
	"github.com/zgolden/zgolden/zfsutil"
)

var goldenProps = []string{"type", "origin", "used", "referenced", "clones", "creation", "createtxg", "volsize", "guid", propKind, propState, propFrom, "receive_resume_token"}

// pickProps is what choosing a generation to clone needs, and what Load's repair of the golden
// tree and the spare worker's pass need: no space accounting and no clone lists, which ZFS
// computes per snapshot (the clones list grows with every volume made from it) and which take
// a second zfs list for the forks among them.
var pickProps = []string{"type", "origin", "creation", "volsize", propKind, propState, "receive_resume_token"}

// lineage is one dataset of a project's golden and its generation snapshots.
type lineage struct {
	name   string
	first  int // the generation it was started with (from its name gN)
	state  string
	origin string
	// token is set on a lineage an interrupted receive left for its resume (transfer.go): it
	// has no generation, is never cloned, and stays across restarts.
	token string
	gens  []driver.Generation
	txgs  []uint64 // each generation's createtxg, as gens is ordered while it is listed
}

// volsizes maps a generation's snapshot to its volsize (0 for a filesystem), read in the same
// zfs list as the generations: a clone has its origin's volsize, so Create needs no zfs get.
type volsizes map[string]uint64

type project struct {
	name     string
	kind     driver.Kind
	lineages []*lineage
}

// generations returns every generation of complete lineages, oldest first.
func (p *project) generations() []driver.Generation {
	var out []driver.Generation
	for _, l := range p.lineages {
		if l.state == "ready" {
			out = append(out, l.gens...)
		}
	}
	sortGens(out)
	return out
}

// newestLineage is the lineage started last: after a completed promotion, the root.
func (p *project) newestLineage() *lineage {
	var newest *lineage
	for _, l := range p.lineages {
		if l.token == "" && (newest == nil || l.first > newest.first) {
			newest = l
		}
	}
	return newest
}

func (p *project) maxGeneration() int {
	n := 0
	for _, l := range p.lineages {
		n = max(n, l.first)
		for _, g := range l.gens {
			n = max(n, g.Number)
		}
	}
	return n
}

func sortGens(g []driver.Generation) {
	for i := 1; i < len(g); i++ { // insertion sort: a project has a handful of generations
		for j := i; j > 0 && g[j].Number < g[j-1].Number; j-- {
			g[j], g[j-1] = g[j-1], g[j]
		}
	}
}

// projects reads the golden tree (of one project when only is not ""), in one zfs list.
func (s *Store) projects(ctx context.Context, only string) (map[string]*project, error) {
	ps, _, err := s.projectsSizes(ctx, only, goldenProps)
	return ps, err
}

// projectsSizes is projects, with the volsize of every generation, reading only props.
func (s *Store) projectsSizes(ctx context.Context, only string, props []string) (map[string]*project, volsizes, error) {
	root := s.goldenRoot()
	if only != "" {
		root = s.projectDataset(only)
	}
	rows, err := s.zfs.List(ctx, root, []string{"filesystem", "volume", "snapshot"}, props)
	if errors.Is(err, zfsutil.ErrNotFound) && only != "" {
		return map[string]*project{}, volsizes{}, nil
	}
	if err != nil {
		return nil, nil, mapErr(err)
	}
	out := map[string]*project{}
	sizes := volsizes{}
	lineages := map[string]*lineage{}
	var forks []zfsutil.Row // fork snapshots a promotion moved into a lineage (fork.go)
	var forked map[string][]string
	if slices.Contains(props, "clones") {
		if forked, err = s.forkedFrom(ctx); err != nil {
			return nil, nil, err
		}
	}
	for _, r := range rows {
		rel := strings.TrimPrefix(r["name"], s.goldenRoot()+"/")
		if rel == r["name"] { // the golden root itself
			continue
		}
		dsPart, snap, isSnap := strings.Cut(rel, "@")
		parts := strings.Split(dsPart, "/")
		switch {
		case len(parts) == 1 && !isSnap:
			out[parts[0]] = &project{name: parts[0], kind: driver.KindOf(r[propKind])}
		case len(parts) == 2 && !isSnap:
			p := out[parts[0]]
			first, err := strconv.Atoi(strings.TrimPrefix(parts[1], "g"))
			if p == nil || err != nil {
				continue
			}
			l := &lineage{name: r["name"], first: first, state: r[propState], origin: r["origin"]}
			if t := r["receive_resume_token"]; t != "-" {
				l.token = t
			}
			p.lineages = append(p.lineages, l)
			lineages[r["name"]] = l
		case len(parts) == 2 && isSnap && strings.HasPrefix(snap, forkPrefix):
			forks = append(forks, r)
		case len(parts) == 2 && isSnap:
			l := lineages[s.goldenRoot()+"/"+dsPart]
			n, err := strconv.Atoi(strings.TrimPrefix(snap, genPrefix))
			if l == nil || !strings.HasPrefix(snap, genPrefix) || err != nil {
				continue
			}
			created, _ := strconv.ParseInt(r["creation"], 10, 64)
			g := driver.Generation{
				Project: parts[0], Number: n, Kind: out[parts[0]].kind, CreatedAt: time.Unix(created, 0).UTC(),
				Used: r.Uint("used"), Referenced: r.Uint("referenced"), Source: r["name"], FromVolume: r[propFrom], GUID: r["guid"],
			}
			g.Dependents = s.dependents(g.Dependents, withForks(r["clones"], forked))
			l.gens = append(l.gens, g)
			l.txgs = append(l.txgs, r.Uint("createtxg"))
			sizes[r["name"]] = r.Uint("volsize")
		}
	}
	for _, r := range forks {
		dsPart, _, _ := strings.Cut(r["name"], "@")
		if l := lineages[dsPart]; l != nil && len(l.gens) > 0 {
			g := &l.gens[l.genAt(r.Uint("createtxg"))]
			g.Dependents = s.dependents(g.Dependents, withForks(r["clones"], forked))
		}
	}
	return out, sizes, nil
}

// forkedFrom maps each volume dataset to the forks cloned from its fork snapshots (fork.go).
func (s *Store) forkedFrom(ctx context.Context) (map[string][]string, error) {
	rows, err := s.zfs.List(ctx, s.volRoot(), []string{"snapshot"}, []string{"clones"})
	if err != nil {
		return nil, mapErr(err)
	}
	out := map[string][]string{}
	for _, r := range rows {
		if ds, _, _ := strings.Cut(r["name"], "@"); isForkSnapshot(r["name"]) && r["clones"] != "" {
			out[ds] = append(out[ds], strings.Split(r["clones"], ",")...)
		}
	}
	return out, nil
}

// withForks adds to clones (a snapshot's clones property) the forks of those clones, and theirs:
// a fork counts against the generation its source was cloned from, as its content does, so that
// golden rm --force removes it too and a reclaim keeps that generation.
func withForks(clones string, forked map[string][]string) string {
	if clones == "" || len(forked) == 0 {
		return clones
	}
	all := strings.Split(clones, ",")
	for i := 0; i < len(all); i++ { // all grows as forks are found: a breadth-first walk
		all = append(all, forked[all[i]]...)
	}
	return strings.Join(all, ",")
}

// dependents appends to deps the volumes among clones (a snapshot's clones property).
func (s *Store) dependents(deps []string, clones string) []string {
	for _, c := range strings.Split(clones, ",") {
		if c == "" || s.removalWaiting(c) {
			continue // a removed volume, destroyed soon: RemoveGeneration empties the trash first
		}
		if v, ok := strings.CutPrefix(c, s.volRoot()+"/"); ok {
			deps = append(deps, v)
		} else if v := s.claimedBy(c); v != "" { // a volume still named as its spare
			deps = append(deps, v)
		}
	}
	return deps
}

// genAt returns the index of the lineage's newest generation taken at or before txg, or of its
// oldest when every generation is newer: the generation a fork snapshot taken at txg is counted
// against (fork.go).
func (l *lineage) genAt(txg uint64) int {
	at := -1
	for i, t := range l.txgs {
		if t <= txg && (at < 0 || t > l.txgs[at]) {
			at = i
		}
	}
	if at >= 0 {
		return at
	}
	at = 0
	for i, t := range l.txgs {
		if t < l.txgs[at] {
			at = i
		}
	}
	return at
}

// Goldens implements driver.Backend.
func (s *Store) Goldens(ctx context.Context) ([]driver.Golden, error) {
	ps, err := s.projects(ctx, "")
	if err != nil {
		return nil, err
	}
	out := make([]driver.Golden, 0, len(ps))
	for _, p := range ps {
		g := driver.Golden{Project: p.name, Kind: p.kind, Generations: p.generations()}
		for _, l := range p.lineages {
			switch {
			case l.token != "":
				g.Partial = &driver.PartialReceive{Project: p.name, Generation: l.first, Token: l.token}
			case l.state != "ready":
				g.Importing = true
			}
		}
		out = append(out, g)
	}
	return out, nil
}

// pickCache remembers what pickGeneration read of each project, so that a Create runs one zfs
// process (the clone) instead of two: under emulation a zfs list costs about as much as the
// clone itself, and make bench measured it as most of the plugin's overhead over a raw zfs clone.
//
// The store is the one writer of its golden tree (the admin commands go through the plugin's
// socket), and every method that changes the tree calls goldensChanged when it is done, which
// retires every entry; reroot calls it before it releases swap, so a Create that waited for a
// promotion never clones from the generations it moved. An entry is tagged with the version read
// before its zfs list, so a list that raced a change is never used after that change. Nothing
// stops a second writer (zfs by hand, or a second plugin given the same parent), so entries also
// expire after pickMaxAge: a generation made elsewhere is used within that time (and at once by
// a Create that would otherwise cold-start or fail for want of it). A generation
// destroyed elsewhere shows at once, as a clone that finds no snapshot: Create then reads the
// tree again and retries once.
type pickCache struct {
	mu      sync.Mutex
	version uint64
	entries map[string]pickEntry
}

// pickMaxAge bounds how long a generation made by another writer can go unseen.
const pickMaxAge = 10 * time.Second

type pickEntry struct {
	version uint64
	read    time.Time
	ps      map[string]*project // never changed once stored: readers share it
	sizes   volsizes
}

// goldensChanged retires every cached pick; call it after any change to the golden tree.
func (s *Store) goldensChanged() {
	s.picks.mu.Lock()
	defer s.picks.mu.Unlock()
	s.picks.version++
	s.picks.entries = nil
}

// pickGeneration returns the generation to clone: number n, or the newest when n is 0, and its
// volsize. It returns nil, 0, nil when the project has no golden (a cold start). fresh skips the
// cache; cached reports whether the answer came from it.
func (s *Store) pickGeneration(ctx context.Context, spec driver.Spec, fresh bool) (g *driver.Generation, size uint64, cached bool, err error) {
	projectName := spec.Golden
	s.picks.mu.Lock()
	e, ok := s.picks.entries[projectName]
	version := s.picks.version
	s.picks.mu.Unlock()
	if !ok || fresh || e.version != version || time.Since(e.read) > pickMaxAge {
		ps, sizes, err := s.projectsSizes(ctx, projectName, pickProps)
		if err != nil {
			return nil, 0, false, err
		}
		e = pickEntry{version: version, read: time.Now(), ps: ps, sizes: sizes}
		s.picks.mu.Lock()
		if s.picks.version == version { // else the tree changed during the list: do not keep it
			if s.picks.entries == nil {
				s.picks.entries = map[string]pickEntry{}
			}
			s.picks.entries[projectName] = e
		}
		s.picks.mu.Unlock()
		ok = false
	}
	g, err = chooseGeneration(e.ps, spec)
	if ok && (g == nil || err != nil) {
		// Only a generation to clone is taken from memory: "no golden" (a cold start, an empty
		// volume) or "no such generation" is confirmed with ZFS, in case another writer made it.
		return s.pickGeneration(ctx, spec, true)
	}
	if g == nil || err != nil {
		return nil, 0, false, err
	}
	return g, e.sizes[g.Source], ok, nil
}

func chooseGeneration(ps map[string]*project, spec driver.Spec) (*driver.Generation, error) {
	p := ps[spec.Golden]
	if p == nil {
		return driver.PickGeneration(spec, "", nil)
	}
	return driver.PickGeneration(spec, p.kind, p.generations())
}

// ensureProject creates the project container if needed and checks its kind.
func (s *Store) ensureProject(ctx context.Context, ps map[string]*project, name string, kind driver.Kind) (*project, error) {
	if p := ps[name]; p != nil {
		if p.kind != kind {
			return nil, driver.KindMismatchError(name, p.kind, kind)
		}
		return p, nil
	}
	props := zfsutil.Props{propKind: string(kind)}
	for k, v := range containerProps {
		props[k] = v
	}
	if err := s.zfs.CreateFilesystem(ctx, s.projectDataset(name), props); err != nil && !errors.Is(err, zfsutil.ErrExists) {
		return nil, mapErr(err)
	}
	return &project{name: name, kind: kind}, nil
}

// Promote implements driver.Backend. See the package doc for why it clones and promotes.
func (s *Store) Promote(ctx context.Context, v driver.Volume, mountpoint, projectName string) (driver.Generation, error) {
	defer s.goldensChanged()
	if err := s.finishClaim(ctx, v.Name); err != nil { // the volume must be at vol/NAME
		return driver.Generation{}, err
	}
	ps, err := s.projects(ctx, projectName)
	if err != nil {
		return driver.Generation{}, err
	}
	p, err := s.ensureProject(ctx, ps, projectName, v.Kind)
	if err != nil {
		return driver.Generation{}, err
	}
	n := p.maxGeneration() + 1
	ds := s.volDataset(v.Name)
	if mountpoint == "" && v.Kind == driver.KindBlock {
		mountpoint = s.premountOf(ds) // an early-mounted spare's XFS is frozen like Docker's mount
	}
	snap := genSnapshot(ds, n)
	target := s.projectDataset(projectName) + "/g" + strconv.Itoa(n)
	log := s.log.WithFields(logrus.Fields{"volume": v.Name, "dataset": ds, "project": projectName, "generation": n, "lineage": target})

	row, err := s.zfs.Get(ctx, ds, append([]string{propState}, bareProps...)...)
	if err != nil {
		return driver.Generation{}, mapErr(err)
	}
	// The promotion makes the volume a clone of the new generation: a bare volume's golden and
	// generation, read from its origin, would change with it (bare.go).
	if _, err := s.settle(ctx, ds, row); err != nil {
		return driver.Generation{}, err
	}
	origin, err := s.chainRoot(ctx, row["origin"])
	if err != nil {
		return driver.Generation{}, err
	}
	if err := s.snapshotConsistent(ctx, v.Kind, mountpoint, snap); err != nil {
		return driver.Generation{}, err
	}
	s.cfg.Faults.Hit("promote:after-snapshot")

	if origin != "" && !inside(s.projectDataset(projectName), origin) {
		// A clone of another project's golden: promoting it would hand this project that
		// project's snapshots. A full send makes an independent lineage instead; it copies the
		// volume's data once.
		log.WithField("origin", origin).Info("promote: full send into a new lineage (the volume was cloned from another golden)")
		if err := s.zfs.SendReceive(ctx, snap, target); err != nil {
			s.rollback(ctx, log, target, target)
			s.dropSnapshot(ctx, log, snap)
			return driver.Generation{}, mapErr(err)
		}
		s.cfg.Faults.Hit("promote:after-copy")
		s.dropSnapshot(ctx, log, snap)
		if err := s.zfs.Set(ctx, target, zfsutil.Props{propState: "ready", "dedup": "off"}); err != nil {
			s.rollback(ctx, log, target, target)
			return driver.Generation{}, mapErr(err)
		}
	} else {
		if err := s.zfs.Clone(ctx, snap, target, zfsutil.Props{propState: "ready", "dedup": "off"}); err != nil {
			s.dropSnapshot(ctx, log, snap)
			return driver.Generation{}, mapErr(err)
		}
		s.cfg.Faults.Hit("promote:after-copy")
		if err := s.reroot(ctx, log, target); err != nil {
			return driver.Generation{}, err
		}
	}
	if err := s.zfs.Set(ctx, genSnapshot(target, n), zfsutil.Props{propFrom: v.Name}); err != nil {
		log.WithError(err).Warn("could not record the source volume on the generation")
	}
	return s.generation(ctx, projectName, n)
}

// chainRoot follows origin up through volumes, the sources of forks (fork.go), to what the
// first of them was cloned from: a generation, or "" for a volume made empty. A promotion's
// reroot walks the same chain, so that is what decides whether it may (see Promote).
func (s *Store) chainRoot(ctx context.Context, origin string) (string, error) {
	for i := 0; i < 16 && inside(s.volRoot(), origin); i++ {
		ds, _, _ := strings.Cut(origin, "@")
		row, err := s.zfs.Get(ctx, ds, "origin")
		if err != nil {
			return "", mapErr(err)
		}
		origin = row["origin"]
	}
	return origin, nil
}

// reroot makes lineage, a fresh clone of a volume's snapshot, the root of its project's golden:
// the first zfs promote moves the volume's snapshot into it (the volume becomes its clone); if the
// lineage then hangs off an older lineage of the project, a second promote moves the older
// generations into it as well. Lineages left without snapshots are destroyed. Load finishes a
// reroot a crash interrupted, so it is written to be repeatable.
func (s *Store) reroot(ctx context.Context, log *logrus.Entry, lineage string) error {
	s.swap.Lock()
	defer s.swap.Unlock()
	defer s.goldensChanged() // before the unlock: see pickCache
	project := lineage[:strings.LastIndex(lineage, "/")]
	// Each promote takes the lineage one level up: from the volume's clone to the volume, then
	// to what the volume hung off, a fork's source (fork.go) or an older lineage, until it is
	// the root. The bound only guards against a loop that ZFS would never produce.
	for i := 0; i < 16; i++ {
		row, err := s.zfs.Get(ctx, lineage, "origin")
		if err != nil {
			return mapErr(err)
		}
		origin := row["origin"]
		if origin == "" || !(inside(s.volRoot(), origin) || inside(project, origin)) {
			break
		}
		log.WithField("origin", origin).Info("promote: zfs promote")
		if err := s.zfs.Promote(ctx, lineage); err != nil {
			return mapErr(err)
		}
	}
	rows, err := s.zfs.List(ctx, project, []string{"filesystem", "volume", "snapshot"}, []string{"type"})
	if err != nil {
		return mapErr(err)
	}
	snaps := map[string]int{}
	for _, r := range rows {
		if ds, _, ok := strings.Cut(r["name"], "@"); ok {
			snaps[ds]++
		}
	}
	for _, r := range rows {
		name := r["name"]
		if r["type"] == "snapshot" || name == project || name == lineage || snaps[name] > 0 {
			continue
		}
		// An old lineage whose generations all moved into the new root: an empty clone head.
		log.WithField("old_lineage", name).Info("promote: destroying the emptied old lineage")
		if err := s.destroy(ctx, name, false); err != nil {
			return err
		}
	}
	return nil
}

// snapshotConsistent snapshots a volume, frozen when its XFS is mounted (xfsutil.Frozen).
func (s *Store) snapshotConsistent(ctx context.Context, kind driver.Kind, mountpoint, snap string) error {
	if kind == driver.KindFS {
		mountpoint = "" // a ZFS filesystem's snapshot is consistent by itself
	}
	return mapErr(xfsutil.Frozen(ctx, mountpoint, func() error { return s.zfs.Snapshot(ctx, snap, nil) }))
}

func (s *Store) dropSnapshot(ctx context.Context, log *logrus.Entry, snap string) {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	if err := s.destroy(cctx, snap, false); err != nil {
		log.WithError(err).WithField("snapshot", snap).Error("could not destroy the promotion snapshot; it is destroyed at the next start")
	}
}

func (s *Store) generation(ctx context.Context, projectName string, n int) (driver.Generation, error) {
	ps, err := s.projects(ctx, projectName)
	if err != nil {
		return driver.Generation{}, err
	}
	if p := ps[projectName]; p != nil {
		for _, g := range p.generations() {
			if g.Number == n {
				return g, nil
			}
		}
	}
	return driver.Generation{}, driver.VanishedError(projectName, n)
}

// BeginGeneration implements driver.Backend: a new lineage, marked importing until Commit sets
// the completion marker, with its filesystem mounted in the work directory.
func (s *Store) BeginGeneration(ctx context.Context, projectName string, kind driver.Kind, size uint64, from string) (driver.GenerationWriter, error) {
	defer s.goldensChanged()
	if err := driver.ValidateProject(projectName); err != nil {
		return nil, err
	}
	ps, err := s.projects(ctx, projectName)
	if err != nil {
		return nil, err
	}
	p, err := s.ensureProject(ctx, ps, projectName, kind)
	if err != nil {
		return nil, err
	}
	n := p.maxGeneration() + 1
	ds := s.projectDataset(projectName) + "/g" + strconv.Itoa(n)
	w := &genWriter{s: s, n: n, ds: ds, from: from, project: projectName,
		dir: filepath.Join(s.cfg.WorkDir, "import-"+projectName+"-"+strconv.Itoa(n)),
		log: s.log.WithFields(logrus.Fields{"project": projectName, "dataset": ds, "generation": n})}
	props := zfsutil.Props{propState: "importing", propKind: string(kind), "dedup": "off", "compression": s.cfg.Compression}
	// Room for the tree twice over (XFS metadata, and growth in later generations); sparse, so
	// only what is written is allocated.
	volSize := max(s.cfg.DefaultSize, roundUp(size*2, 1<<30))
	if err := s.createEmpty(ctx, ds, ds, kind, volSize, props); err != nil {
		return nil, err
	}
	s.cfg.Faults.Hit("import:after-create")
	if kind == driver.KindFS {
		err = xfsutil.MountFS(ctx, "zfs", ds, w.dir, nil)
	} else {
		var dev string // createEmpty waited for it; this asks again for the checked node
		if dev, err = s.zfs.WaitDevice(ctx, ds, s.cfg.DeviceTimeout); err == nil {
			err = xfsutil.Mount(ctx, dev, w.dir, xfsutil.MountOptions(false))
		}
	}
	if err != nil {
		s.rollback(ctx, w.log, ds, ds)
		return nil, mapErr(err)
	}
	return w, nil
}

// genWriter is the ZFS store's driver.GenerationWriter: a new lineage PROJECT/gN, mounted at dir.
type genWriter struct {
	s       *Store
	n       int
	ds      string
	project string
	from    string
	dir     string
	log     *logrus.Entry
}

func (w *genWriter) Number() int { return w.n }
func (w *genWriter) Dir() string { return w.dir }

// unmount unmounts the lineage's filesystem, bounded on its own: a cancelled import still
// unmounts what it mounted.
func (w *genWriter) unmount(ctx context.Context) error {
	uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	defer cancel()
	if err := xfsutil.UnmountRetry(uctx, w.dir, 10); err != nil {
		return mapErr(err)
	}
	_ = os.Remove(w.dir)
	return nil
}

// Abort implements driver.GenerationWriter.
func (w *genWriter) Abort(ctx context.Context) {
	defer w.s.goldensChanged()
	if err := w.unmount(ctx); err != nil {
		w.log.WithError(err).Error("could not unmount the import; it is cleaned up at the next start")
	}
	w.s.rollback(ctx, w.log, w.ds, w.ds)
}

// Commit implements driver.GenerationWriter: unmount, set the completion marker, snapshot.
func (w *genWriter) Commit(ctx context.Context, _ func(string)) (driver.Generation, error) {
	defer w.s.goldensChanged()
	fail := func(err error) (driver.Generation, error) {
		w.s.rollback(ctx, w.log, w.ds, w.ds)
		return driver.Generation{}, err
	}
	if err := w.unmount(ctx); err != nil {
		return fail(err)
	}
	w.s.cfg.Faults.Hit("import:after-copy")
	// The completion marker. From here a crash rolls forward: Load snapshots a ready lineage.
	if err := w.s.zfs.Set(ctx, w.ds, zfsutil.Props{propState: "ready"}); err != nil {
		return fail(mapErr(err))
	}
	w.s.cfg.Faults.Hit("import:after-marker")
	// The filesystem is unmounted, so the snapshot is consistent without a freeze.
	if err := w.s.zfs.Snapshot(ctx, genSnapshot(w.ds, w.n), zfsutil.Props{propFrom: w.from}); err != nil {
		return fail(mapErr(err))
	}
	return w.s.generation(ctx, w.project, w.n)
}

// OwnDirs implements driver.Backend: the ZFS store keeps nothing on the host's filesystems
// outside the driver's mount root and state directory.
func (s *Store) OwnDirs() map[string]string { return nil }

// RemoveGeneration implements driver.Backend.
func (s *Store) RemoveGeneration(ctx context.Context, projectName string, n int) error {
	defer s.goldensChanged()
	s.spares.make.Lock() // until the destroy is done: see retireSpares
	defer s.spares.make.Unlock()
	if err := s.retireSpares(ctx, projectName, n); err != nil {
		return err
	}
	// Removed volumes still pin the generations they were cloned from until destroyed.
	_ = s.emptyTrash(ctx, false)
	ps, err := s.projects(ctx, projectName)
	if err != nil {
		return err
	}
	p := ps[projectName]
	if p == nil {
		return driver.GoldenMissingError(projectName)
	}
	for _, l := range p.lineages {
		for _, g := range l.gens {
			if g.Number != n {
				continue
			}
			if len(g.Dependents) > 0 {
				return driver.InUseError(projectName, n, g.Dependents)
			}
			// Dependents names volumes only. A generation can also be the origin of another of
			// the project's lineages (the guest's stress test reached that with racing
			// promotions), and a Create may have cloned it since the list: ZFS refuses both,
			// atomically, and either way the generation is in use, not an error of Reclaim's.
			err := s.destroy(ctx, g.Source, false)
			if errors.Is(err, driver.ErrHasDependents) {
				return fmt.Errorf("%w: generation %d of %q still has clones: %v", driver.ErrGenerationInUse, n, projectName, err)
			}
			if err != nil {
				return err
			}
			if len(l.gens) == 1 { // its last generation: the lineage itself is now dead weight
				return s.destroy(ctx, l.name, true)
			}
			return nil
		}
	}
	return driver.GenerationMissingError(projectName, n)
}

// RemoveGolden implements driver.Backend.
func (s *Store) RemoveGolden(ctx context.Context, projectName string) error {
	defer s.goldensChanged()
	s.spares.make.Lock() // until the destroy is done: see retireSpares
	defer s.spares.make.Unlock()
	if err := s.retireSpares(ctx, projectName, 0); err != nil {
		return err
	}
	// Removed volumes still pin the generations they were cloned from until destroyed.
	_ = s.emptyTrash(ctx, false)
	ps, err := s.projects(ctx, projectName)
	if err != nil {
		return err
	}
	p := ps[projectName]
	if p == nil {
		return driver.GoldenMissingError(projectName)
	}
	var deps []string
	for _, l := range p.lineages {
		for _, g := range l.gens {
			deps = append(deps, g.Dependents...)
		}
	}
	if len(deps) > 0 {
		return driver.DependentsError(deps)
	}
	return s.destroy(ctx, s.projectDataset(projectName), true)
}

// cleanGoldens repairs the golden tree after a crash: it unmounts leftover import mounts, wipes
// lineages whose import or promotion never completed, and rolls forward the two steps that are
// safe to finish (a clone waiting for its zfs promote, an import waiting for its snapshot).
func (s *Store) cleanGoldens(ctx context.Context) error {
	defer s.goldensChanged()
	if mounts, err := xfsutil.MountsUnder(s.cfg.WorkDir); err == nil {
		for _, m := range mounts {
			// Early mounts (premount.go) are spares' and kept volumes': loadPremounts checks them.
			if m.Mountpoint == filepath.Clean(s.cfg.WorkDir) || strings.HasPrefix(m.Mountpoint, s.premountDir()+"/") || m.Mountpoint == s.premountDir() {
				continue
			}
			s.log.WithField("mountpoint", m.Mountpoint).Warn("unmounting a golden left mounted by an interrupted import")
			if err := xfsutil.UnmountRetry(ctx, m.Mountpoint, 10); err != nil {
				return err
			}
			_ = os.Remove(m.Mountpoint)
		}
	}
	// Lineages, their states and generations only: no dependents, whose clone lists cost a
	// second zfs list at every start (pickProps).
	ps, _, err := s.projectsSizes(ctx, "", pickProps)
	if err != nil {
		return err
	}
	for _, p := range ps {
		for _, l := range p.lineages {
			log := s.log.WithFields(logrus.Fields{"project": p.name, "dataset": l.name})
			switch {
			case l.token != "":
				log.Info("keeping a partial receive: the next transfer of its generation resumes it, any other replaces it")
			case l.state != "ready":
				log.Warn("wiping a golden whose import, promotion or receive did not complete")
				if err := s.destroy(ctx, l.name, true); err != nil {
					return err
				}
			case inside(s.volRoot(), l.origin) || l == p.newestLineage() && inside(s.projectDataset(p.name), l.origin):
				log.Warn("finishing an interrupted promotion (zfs promote)")
				if err := s.reroot(ctx, log, l.name); err != nil {
					return err
				}
			case len(l.gens) == 0 && l.origin == "":
				log.Warn("finishing an interrupted import (its copy completed; taking the snapshot)")
				if err := s.zfs.Snapshot(ctx, genSnapshot(l.name, l.first), nil); err != nil {
					return mapErr(err)
				}
			}
		}
	}
	return nil
}
