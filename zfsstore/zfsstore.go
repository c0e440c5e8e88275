// Package zfsstore is zgolden's ZFS backend: each golden generation is a snapshot of a sparse zvol
// holding XFS (or of a filesystem dataset), and each volume is an O(1) zfs clone of one.
//
// Layout under the configured parent dataset (names cannot collide: volumes and goldens live
// under different children):
//
//	PARENT                      filesystem, zgolden:owner=zgolden
//	PARENT/vol/NAME             one volume: a clone of a generation, or a fresh zvol
//	PARENT/golden/PROJECT       a project's container
//	PARENT/golden/PROJECT/gN    a lineage: a zvol (or filesystem) whose snapshots @genN are the
//	                            generations; gN is named after its first generation
//	PARENT/trash/NAME.ID        a removed volume until it is destroyed (trash.go)
//
// Promotion is O(1): the volume's snapshot is cloned into a new lineage and `zfs promote`d, which
// moves the snapshot (and the volume's history) to the lineage and makes the volume a clone of it.
// When the volume was itself a clone of this project's golden, the new lineage is promoted once
// more, which moves the older generations into it too: the newest lineage is always the root,
// the old one is left without snapshots and is destroyed, and clone chains never grow with
// promotions (a single zfs promote only detaches one level; docs/design-facts.md, "Clone chains").
package zfsstore

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/internal/fault"
	"github.com/zgolden/zgolden/internal/proclock"
	"github.com/zgolden/zgolden/internal/recordfile"
	"github.com/zgolden/zgolden/xfsutil"
	"github.com/zgolden/zgolden/zfsutil"
)

// User properties: the store's durable state, the driver's metadata schema (driver.MetaKind
// and the rest) under the prefix "zgolden:". They are set in the same command that creates the
// dataset, clone or snapshot, so no dataset is ever seen without them.
const (
	propPrefix     = "zgolden:"
	propOwner      = propPrefix + "owner" // on PARENT: this tree is zgolden's
	propKind       = propPrefix + driver.MetaKind
	propGolden     = propPrefix + driver.MetaGolden
	propGeneration = propPrefix + driver.MetaGeneration
	propColdStart  = propPrefix + driver.MetaColdStart
	propCreated    = propPrefix + driver.MetaCreated
	propState      = propPrefix + driver.MetaState // creating|ready on volumes; importing|ready on lineages
	propFrom       = propPrefix + driver.MetaFrom
	propGrow       = propPrefix + driver.MetaGrow

	ownerValue = "zgolden"
	genPrefix  = "gen"
)

// Config configures the ZFS store.
type Config struct {
	Parent        string          // parent dataset, such as tank/zgolden
	Volblocksize  string          // for new zvols; 8K (see docs/design-facts.md, "Volblocksize")
	Compression   string          // for new datasets; lz4
	Discard       bool            // mount XFS with discard
	DeviceTimeout time.Duration   // bound on waiting for /dev/zvol nodes
	DefaultSize   uint64          // size of a fresh zvol, and of an imported golden at least
	WorkDir       string          // where imports mount their golden while copying
	Faults        *fault.Injector // crash points for tests; nil in production
	// Adopt lets the store use a parent dataset that already has children it did not create.
	Adopt bool
	// Spares is how many warm spare clones of each block project's newest generation to keep
	// (spares.go); 0 makes none. RecordDir is where claims of spares are recorded durably; it
	// must survive reboots (not /run). Claims recorded there are honoured with Spares 0 too.
	Spares    int
	RecordDir string
	// ProvenZFS lists the module series (such as "2.3") the zfs userland is proven to drive
	// besides its own; New refuses any other pair (zfsutil.CheckPair).
	ProvenZFS []string
	// Versions, when set, is what Versions returned a moment ago with no error (the plugin
	// checks the pair before it chooses a backend); New then reads them again only when unset.
	Versions *ZFSVersions
	Log      *logrus.Entry
}

// Store is the ZFS backend.
type Store struct {
	cfg  Config
	zfs  *zfsutil.ZFS
	log  *logrus.Entry
	lock *proclock.Lock // the parent's, in the record directory; see lockParent
	// pmHints maps a dataset to where premountOf last found its early mount (premount.go);
	// renames counts the renames renameHint has followed, so that a scan begun before one
	// does not put back the name it took away.
	pmHints struct {
		sync.Mutex
		m       map[string]earlyMount
		renames uint64
	}
	// swap is read-locked by a Create from picking a generation until its clone exists, and
	// write-locked while a promotion moves generation snapshots between lineages (two zfs
	// promotes, O(1) each): a racing Create must never look for a snapshot that is moving. The
	// waits under the read lock are the clone's, and, when an earlier run's dataset holds the
	// name (clearStale, rare), its destroy and a second clone.
	swap sync.RWMutex

	// growing holds the volumes whose zgolden:grow property is set, so that Mount knows without
	// running zfs get (one process costs more than the mount itself under emulation, and is
	// pure overhead on every first mount). The property stays the durable truth: Load refills
	// this from it.
	growMu  sync.Mutex
	growing map[string]bool

	// picks remembers each project's generations for Create (see pickCache).
	picks pickCache

	// trash holds removed volumes until the worker has destroyed them (see trash.go).
	trash trash

	versions ZFSVersions // read once by New; a module cannot change under a running store
	opened   time.Time   // when New ran: a volume created before it is an earlier run's (clearStale)

	// cloning counts the Creates making a dataset now; the trash worker yields to them
	// (removal.go).
	cloning atomic.Int32

	// oneTask is set while the module can clone in one sync task (clone.go); cleared for good
	// when the module turns out not to.
	oneTask atomic.Bool

	// tomb holds the names whose timed-out Create is still being cleaned up (see slow.go).
	tomb tombstones

	// spares are the warm clones and the claims of them (see spares.go).
	spares spareSet

	// settling stores bare volumes' properties in the background (see bare.go).
	settling settling

	// recs is the record file of claims and removals (see records.go).
	recs recordfile.Lazy
}

var _ driver.Backend = (*Store)(nil)

// Check reports, as one error naming what is missing and what to do, whether ZFS can serve parent:
// the zfs tool, /dev/zfs, the pool and the parent dataset (or its parent, to create it in).
// The userland and module pair is checked by openBackend before, and by New after.
func Check(ctx context.Context, parent string) error {
	if _, err := exec.LookPath("zfs"); err != nil {
		return fmt.Errorf("the zfs command is not installed (apt-get install zfsutils-linux): %w", err)
	}
	if _, err := os.Stat("/dev/zfs"); err != nil {
		return errors.New("/dev/zfs is missing: the ZFS kernel module is not loaded (modprobe zfs)")
	}
	if parent == "" {
		return errors.New("no parent dataset configured: pass --parent POOL/DATASET (or ZGOLDEN_PARENT)")
	}
	if err := validDataset(parent); err != nil {
		return err
	}
	z := zfsutil.New(logrus.NewEntry(logrus.StandardLogger()))
	pool := zfsutil.PoolOf(parent)
	ok, err := z.Exists(ctx, pool)
	if err != nil {
		return fmt.Errorf("cannot query ZFS: %w", err)
	}
	if !ok {
		return fmt.Errorf("ZFS pool %q is not imported yet (zpool import %s), or does not exist", pool, pool)
	}
	return nil
}

// Present says whether this host has ZFS at all: the zfs command and the module's /dev/zfs.
func Present() bool {
	_, err := exec.LookPath("zfs")
	_, serr := os.Stat("/dev/zfs")
	return err == nil && serr == nil
}

// ZFSVersions is what Status reports of the tools the store drives.
type ZFSVersions struct {
	Module, Userland string   // as the module and `zfs version` report them
	Proven           []string // the module series the userland is proven on (Config.ProvenZFS)
}

// Versions reads the module's and the userland's versions and checks the pair
// (zfsutil.CheckPair). The error wraps zfsutil.ErrPair when the pair is refused.
func Versions(ctx context.Context, z *zfsutil.ZFS, proven []string) (ZFSVersions, error) {
	v := ZFSVersions{Proven: proven}
	var err error
	if v.Module, err = zfsutil.ModuleVersion(); err != nil {
		return v, err
	}
	if v.Userland, err = z.UserlandVersion(ctx); err != nil {
		return v, err
	}
	mod, err := zfsutil.ParseRelease(v.Module)
	if err != nil {
		return v, fmt.Errorf("%s: %w", zfsutil.ModuleVersionFile, err)
	}
	user, err := zfsutil.ParseRelease(v.Userland)
	if err != nil {
		return v, fmt.Errorf("zfs version: %w", err)
	}
	return v, zfsutil.CheckPair(mod, user, proven)
}

func validDataset(name string) error {
	for _, part := range strings.Split(name, "/") {
		if part == "" || driver.ValidateProject(part) != nil && driver.ValidateName(part) != nil {
			return fmt.Errorf("parent dataset %q is not a valid dataset name (components of letters, digits, '_', '.', '-')", name)
		}
	}
	return nil
}

// New opens the store, creating PARENT, PARENT/vol, PARENT/golden and PARENT/trash when missing.
// It refuses a parent that has children zgolden did not create, unless cfg.Adopt is set.
func New(ctx context.Context, cfg Config) (*Store, error) {
	if cfg.Log == nil {
		cfg.Log = logrus.NewEntry(logrus.StandardLogger())
	}
	if cfg.Volblocksize == "" {
		cfg.Volblocksize = "8K"
	}
	if cfg.Compression == "" {
		cfg.Compression = "lz4"
	}
	if cfg.DefaultSize == 0 {
		cfg.DefaultSize = 100 << 30
	}
	if cfg.WorkDir == "" {
		cfg.WorkDir = "/run/zgolden/work"
	}
	if cfg.DeviceTimeout == 0 {
		// Docker gives Create 2 minutes; a loaded host's udev can take tens of seconds.
		cfg.DeviceTimeout = 90 * time.Second
	}
	if err := validDataset(cfg.Parent); err != nil {
		return nil, err
	}
	s := &Store{cfg: cfg, zfs: zfsutil.New(cfg.Log), log: cfg.Log.WithField("backend", "zfs"), growing: map[string]bool{}, opened: time.Now()}
	if err := s.lockParent(); err != nil {
		return nil, err
	}
	var err error
	if cfg.Versions != nil {
		s.versions = *cfg.Versions
	} else {
		s.versions, err = Versions(ctx, s.zfs, cfg.ProvenZFS)
	}
	if err == nil {
		s.oneTask.Store(oneTaskModule(s.versions.Module))
		s.log.WithFields(logrus.Fields{"zfs_module": s.versions.Module, "zfs_userland": s.versions.Userland, "one_task_clone": s.oneTask.Load()}).Info("zfs userland and module accepted")
		err = s.initParent(ctx)
	}
	if err != nil {
		s.lock.Release()
		return nil, err
	}
	s.startTrash()
	s.spares.ready = map[string][]spare{}
	s.spares.claims = map[string]*claim{}
	s.spares.wake = make(chan struct{}, 1)
	return s, nil
}

// A container is a filesystem that only holds other datasets: never mounted.
var containerProps = zfsutil.Props{"canmount": "off", "mountpoint": "none"}

// initParent makes PARENT and its four containers where missing, and sets what volumes and
// spares inherit. One listing of PARENT and its children answers every question it asks: a
// start-up runs it, and each zfs process costs a tenth of a second under emulation and more on
// a loaded host.
func (s *Store) initParent(ctx context.Context) error {
	p := s.cfg.Parent
	rows, err := s.zfs.ListChildren(ctx, p, []string{"filesystem", "volume"}, []string{"type", propOwner, "dedup", "compression"})
	have := map[string]zfsutil.Row{}
	for _, r := range rows {
		have[r["name"]] = r
	}
	row := have[p]
	switch {
	case errors.Is(err, zfsutil.ErrNotFound):
		props := zfsutil.Props{propOwner: ownerValue}
		maps.Copy(props, containerProps)
		if err := s.zfs.CreateFilesystem(ctx, p, props); err != nil {
			return fmt.Errorf("create parent dataset %s: %w", p, err)
		}
		s.log.WithField("dataset", p).Info("created parent dataset")
	case err != nil:
		return fmt.Errorf("parent dataset %s: %w", p, err)
	case row == nil:
		return fmt.Errorf("parent dataset %s: zfs list did not list it", p)
	case row["type"] != "filesystem":
		return fmt.Errorf("parent dataset %s is a %s; it must be a filesystem", p, row["type"])
	case row[propOwner] != ownerValue:
		rows, err := s.zfs.List(ctx, p, []string{"all"}, nil)
		if err != nil {
			return err
		}
		if len(rows) > 1 && !s.cfg.Adopt {
			return fmt.Errorf("parent dataset %s already holds %d datasets that zgolden did not create; choose an empty or new dataset, or pass --adopt to share it", p, len(rows)-1)
		}
		if err := s.zfs.Set(ctx, p, zfsutil.Props{propOwner: ownerValue}); err != nil {
			return err
		}
	}
	for _, child := range []string{s.volRoot(), s.goldenRoot(), s.trashRoot(), s.spareRoot()} {
		if have[child] != nil {
			continue
		}
		props := maps.Clone(containerProps)
		if child == s.volRoot() || child == s.spareRoot() {
			maps.Copy(props, s.inherited())
		}
		if err := s.zfs.CreateFilesystem(ctx, child, props); err != nil && !errors.Is(err, zfsutil.ErrExists) {
			return fmt.Errorf("create %s: %w", child, err)
		}
		// Made with these properties, or by a racing start with the same (ErrExists): either
		// way initInherited has nothing to set.
		have[child] = zfsutil.Row(props)
	}
	return s.initInherited(ctx, have)
}

// Name implements driver.Backend.
func (s *Store) Name() string { return "zfs" }

func (s *Store) volRoot() string               { return s.cfg.Parent + "/vol" }
func (s *Store) goldenRoot() string            { return s.cfg.Parent + "/golden" }
func (s *Store) volDataset(name string) string { return s.volRoot() + "/" + name }
func (s *Store) projectDataset(p string) string {
	return s.goldenRoot() + "/" + p
}
func genSnapshot(lineage string, n int) string { return lineage + "@" + genPrefix + strconv.Itoa(n) }

// inside reports whether ds is at or below root. Every destroy goes through it: nothing outside the
// parent dataset is ever touched, whatever a name says.
func inside(root, ds string) bool {
	return ds == root || strings.HasPrefix(ds, root+"/") || strings.HasPrefix(ds, root+"@")
}

func (s *Store) destroy(ctx context.Context, ds string, recursive bool) error {
	if !inside(s.cfg.Parent, ds) || ds == s.cfg.Parent {
		return fmt.Errorf("refusing to destroy %s: it is outside zgolden's parent dataset %s", ds, s.cfg.Parent)
	}
	if err := s.unmountPremount(ctx, ds); err != nil {
		return mapErr(err)
	}
	err := s.retryBusy(ctx, func() error { return s.zfs.Destroy(ctx, ds, recursive) })
	switch {
	case err == nil || errors.Is(err, zfsutil.ErrNotFound):
		return nil
	// A user hold: an export's (transfer.go), or one placed by hand. 2.4 says "it's being
	// held"; 2.1 only "dataset is busy", so a busy snapshot's holds are counted.
	case errors.Is(err, zfsutil.ErrHeld), errors.Is(err, zfsutil.ErrBusy) && strings.Contains(ds, "@") && s.held(ctx, ds):
		return fmt.Errorf("%w: %v (a user hold keeps it: a golden export holds it until its stream ends)", driver.ErrGenerationInUse, err)
	case errors.Is(err, zfsutil.ErrBusy):
		return busy(err, ds)
	}
	return mapErr(err)
}

// busy words a destroy or rename that stayed busy through retryBusy.
func busy(err error, ds string) error {
	return fmt.Errorf("%w: %v; something still holds its device open (check `fuser -v %s`)", driver.ErrBusy, err, zfsutil.DevicePath(ds))
}

// mapErr turns zfsutil's errors into the driver's, keeping the message.
func mapErr(err error) error {
	for _, m := range []struct{ from, to error }{
		{zfsutil.ErrNotFound, driver.ErrNotFound},
		{zfsutil.ErrExists, driver.ErrExists},
		{zfsutil.ErrBusy, driver.ErrBusy},
		{zfsutil.ErrNoSpace, driver.ErrNoSpace},
		{zfsutil.ErrHasDependents, driver.ErrHasDependents},
		{xfsutil.ErrNoSpace, driver.ErrNoSpace},
		{xfsutil.ErrBusy, driver.ErrBusy},
	} {
		if errors.Is(err, m.from) {
			return fmt.Errorf("%w: %v", m.to, err)
		}
	}
	return err
}

var volProps = []string{"type", "origin", "creation", "volsize", propKind, propGolden, propGeneration, propColdStart, propCreated, propState, propGrow, propForkOf}

// setGrowing records whether a volume's XFS must be grown at its next mount (see Store.growing).
func (s *Store) setGrowing(name string, grow bool) {
	s.growMu.Lock()
	defer s.growMu.Unlock()
	if grow {
		s.growing[name] = true
	} else {
		delete(s.growing, name)
	}
}

func (s *Store) isGrowing(name string) bool {
	s.growMu.Lock()
	defer s.growMu.Unlock()
	return s.growing[name]
}

// Load implements driver.Backend: it destroys volumes whose Create never finished, snapshots left
// on volumes by an interrupted promotion, and lineages left by an interrupted import or promotion;
// then it returns every complete volume.
func (s *Store) Load(ctx context.Context) ([]driver.Volume, error) {
	if err := s.cleanGoldens(ctx); err != nil {
		return nil, err
	}
	if err := s.releaseExportHolds(ctx); err != nil {
		return nil, fmt.Errorf("holds of interrupted exports: %w", err)
	}
	if err := s.loadTrash(ctx); err != nil {
		return nil, err
	}
	if err := s.loadPremounts(); err != nil {
		return nil, fmt.Errorf("early mounts of spares: %w", err)
	}
	removed, err := s.loadRemovals(ctx)
	if err != nil {
		return nil, err
	}
	vols, err := s.loadSpares(ctx, removed)
	if err != nil {
		return nil, err
	}
	rows, err := s.zfs.List(ctx, s.volRoot(), []string{"volume", "filesystem", "snapshot"}, slices.Concat(volProps, []string{"clones"}))
	if err != nil {
		return nil, fmt.Errorf("list volumes under %s: %w", s.volRoot(), err)
	}
	for _, r := range rows {
		name := r["name"]
		if name == s.volRoot() || removed[name] {
			continue
		}
		log := s.log.WithField("dataset", name)
		if r["type"] == "snapshot" && isForkSnapshot(name) {
			if r["clones"] == "" { // a crash between a fork's snapshot and its clone, or after its fork went
				log.Warn("destroying a fork snapshot that no fork hangs off")
				if err := s.destroy(ctx, name, false); err != nil {
					return nil, err
				}
			}
			continue
		}
		if r["type"] == "snapshot" { // volumes keep no other snapshots; this one is from a dead promotion
			log.Warn("destroying a snapshot left by an interrupted promotion")
			if err := s.destroy(ctx, name, false); err != nil {
				return nil, err
			}
			continue
		}
		vname := strings.TrimPrefix(name, s.volRoot()+"/")
		if strings.Contains(vname, "/") || driver.ValidateName(vname) != nil {
			log.Warn("ignoring a dataset under the volume root that zgolden did not create")
			continue
		}
		bare := s.fillBare(r)
		if r[propState] != "ready" {
			log.Warn("destroying a volume whose create was interrupted")
			if err := s.destroy(ctx, name, true); err != nil {
				return nil, err
			}
			// An interrupted fork's snapshot carried only this clone (each fork has its own):
			// it goes now rather than at the next start, which would find it without a clone.
			// Not fatal: the next start drops it once it has no clone.
			if o := r["origin"]; isForkSnapshot(o) && inside(s.volRoot(), o) {
				if err := s.destroy(ctx, o, false); err != nil {
					log.WithError(err).WithField("snapshot", o).Warn("could not destroy the interrupted fork's snapshot; the next start does")
				}
			}
			continue
		}
		if c := s.claimOf(vname); c != nil {
			log.WithField("spare", c.Dataset).Error("a volume exists both as a dataset and as a claimed spare; keeping the claim, leaving the dataset alone")
			continue
		}
		if bare {
			s.settleLater(vname) // an earlier run's, which it had not settled
		}
		s.setGrowing(vname, r[propGrow] == driver.MetaYes)
		vols = append(vols, volumeFromRow(vname, r))
	}
	return vols, nil
}

func volumeFromRow(name string, r zfsutil.Row) driver.Volume {
	v := driver.VolumeFromMeta(name, func(key string) string { return r[propPrefix+key] })
	v.Size, v.Source = r.Uint("volsize"), r["name"]
	return v
}

// Create implements driver.Backend.
func (s *Store) Create(ctx context.Context, spec driver.Spec) (driver.Volume, error) {
	v, err := s.create(ctx, spec)
	return v, s.slowPool(err)
}

func (s *Store) create(ctx context.Context, spec driver.Spec) (driver.Volume, error) {
	ds := s.volDataset(spec.Name)
	ctx, cancel := workContext(ctx)
	defer cancel()
	if err := s.freeName(ctx, spec.Name); err != nil {
		return driver.Volume{}, err
	}
	now := time.Now().UTC()
	props := zfsutil.Props{
		propKind:    string(spec.Kind),
		propCreated: strconv.FormatInt(now.Unix(), 10),
		// dedup=off whatever the pool inherits: clones share blocks through their snapshot, and a
		// dedup table would only add RAM and write latency (the seeds measured 4-6x).
		"dedup":       "off",
		"compression": s.cfg.Compression,
	}
	v := driver.Volume{Name: spec.Name, Kind: spec.Kind, Golden: spec.Golden, CreatedAt: now.Truncate(time.Second), Source: ds}

	var gen *driver.Generation
	var genSize uint64
	pickCached := false
	bare := false // cloned without properties, which settleLater stores (bare.go)
	// swap is held from the pick until the clone exists, and no longer: the device wait below
	// can last a minute under load, and a promotion waiting for swap would block every Create
	// behind it (a waiting writer blocks new readers).
	unlock := func() {}
	defer func() { unlock() }()
	if spec.Golden != "" {
		s.swap.RLock()
		var once sync.Once
		unlock = func() { once.Do(s.swap.RUnlock) }
		pickStart := time.Now()
		g, size, cached, err := s.pickGeneration(ctx, spec, false)
		if err != nil {
			return v, err
		}
		gen, genSize, pickCached = g, size, cached
		if !cached {
			s.log.WithFields(logrus.Fields{"volume": spec.Name, "dataset": ds, "took": time.Since(pickStart).Round(time.Microsecond).String()}).Debug("read the golden's generations from ZFS")
		}
	}
	log := s.log.WithFields(logrus.Fields{"volume": spec.Name, "dataset": ds})
	if gen != nil && spec.Kind == driver.KindBlock && spec.Size == 0 {
		if v, ok := s.claimSpare(spec, gen, genSize, log); ok {
			return v, nil
		}
		if m := s.awaitable(spec.Golden, gen.Number); m != nil {
			unlock() // a promotion must not wait behind this wait (see swap)
			v, ok, err := s.awaitSpare(ctx, m, spec, genSize, log)
			if ok || err != nil {
				return v, err
			}
			// No spare after all: clone. gen may have been replaced or reclaimed meanwhile; a
			// clone of a generation that is gone reads the golden again (pickCached).
			s.swap.RLock()
			var once sync.Once
			unlock = func() { once.Do(s.swap.RUnlock) }
			pickCached = true
		}
	}
	s.cloning.Add(1)
	defer s.cloning.Add(-1)
	if gen != nil {
		props[propGolden] = spec.Golden
		props[propGeneration] = strconv.Itoa(gen.Number)
		props[propState] = "ready" // a clone is complete the moment it exists
		v.Generation = gen.Number
		if spec.Kind == driver.KindFS {
			props["mountpoint"] = "legacy"
			if spec.Size > 0 {
				props["refquota"] = strconv.FormatUint(spec.Size, 10)
			}
		}
		grow := spec.Kind == driver.KindBlock && spec.Size > 0
		if grow {
			props[propState] = "creating" // until the volsize change below is done
		}
		cloneProps := props
		if s.cloneBare(spec) {
			cloneProps = nil // one sync task, not two: its properties are derived (bare.go)
			bare = true
		}
		err := s.clone(ctx, gen.Source, ds, cloneProps)
		if errors.Is(err, zfsutil.ErrNotFound) && pickCached {
			// The cached generation was destroyed behind the store's back: read the tree again.
			log.WithError(err).WithField("snapshot", gen.Source).Warn("the cached generation is gone; reading the golden again")
			g, size, _, perr := s.pickGeneration(ctx, spec, true)
			if perr != nil {
				return v, perr
			}
			if g == nil {
				return v, fmt.Errorf("%w: golden %q lost its generations while this volume was made; retry", driver.ErrNotFound, spec.Golden)
			}
			gen, genSize = g, size
			props[propGeneration] = strconv.Itoa(gen.Number)
			v.Generation = gen.Number
			err = s.clone(ctx, gen.Source, ds, cloneProps)
		}
		if errors.Is(err, zfsutil.ErrExists) && s.clearStale(ctx, spec.Name, ds, log) {
			err = s.clone(ctx, gen.Source, ds, cloneProps)
		}
		unlock() // the clone exists (or failed): its origin may move now
		if err != nil {
			s.cleanupLate(spec.Name, ds, err, log)
			return v, mapErr(err)
		}
		s.cfg.Faults.Hit("create:after-clone")
		v.Size = genSize // a clone has its origin's volsize, unless grown
		if grow {
			size, err := s.grow(ctx, ds, spec.Size)
			if err != nil {
				s.rollback(ctx, log, spec.Name, ds)
				return v, err
			}
			v.Size = size
		}
	} else {
		if spec.Golden != "" {
			props[propGolden] = spec.Golden
			props[propColdStart] = driver.MetaYes
			v.ColdStart = true
		}
		err := s.createEmpty(ctx, spec.Name, ds, spec.Kind, spec.Size, props)
		if errors.Is(err, driver.ErrExists) && s.clearStale(ctx, spec.Name, ds, log) {
			err = s.createEmpty(ctx, spec.Name, ds, spec.Kind, spec.Size, props)
		}
		if err != nil {
			return v, err
		}
		s.cfg.Faults.Hit("create:after-format") // made and formatted, still marked creating
		if err := s.zfs.Set(ctx, ds, zfsutil.Props{propState: "ready"}); err != nil {
			s.rollback(ctx, log, spec.Name, ds)
			return v, mapErr(err)
		}
	}
	if spec.Kind == driver.KindBlock {
		// Wait here, not only in Mount, so a Create that returns has a usable device and a udev
		// problem shows up at create time.
		if _, err := s.zfs.WaitDevice(ctx, ds, s.cfg.DeviceTimeout); err != nil {
			s.rollback(ctx, log, spec.Name, ds)
			return v, err
		}
		s.cfg.Faults.Hit("create:after-device")
	}
	if gen != nil {
		if bare {
			s.settleLater(spec.Name)
		}
		// Everything a zfs get would read back was set by the clone itself, or is derived from
		// it (bare.go): skip that process (Create's latency is the product; see make bench).
		// CreatedAt as Load reads it back; for a bare clone Load reads ZFS's creation, which
		// is this second or, on a busy pool, the few seconds later its sync task ran.
		v.CreatedAt = time.Unix(now.Unix(), 0).UTC()
		s.setGrowing(spec.Name, v.Size > genSize)
		return v, nil
	}
	row, err := s.zfs.Get(ctx, ds, volProps...)
	if err != nil {
		s.rollback(ctx, log, spec.Name, ds)
		return v, mapErr(err)
	}
	s.setGrowing(spec.Name, row[propGrow] == driver.MetaYes)
	return volumeFromRow(spec.Name, row), nil
}

// freeName makes sure name is free for a new dataset at vol/NAME: no timed-out Create of it is
// still being cleaned up, no claimed spare of it is being renamed, and a removed volume of the
// name is moved out of the way (removal.go).
func (s *Store) freeName(ctx context.Context, name string) error {
	if err := s.refuseTombstoned(name); err != nil {
		return err
	}
	s.waitSettle(name) // a settle must not set an old volume's properties on the new one (bare.go)
	if err := s.waitRenaming(name); err != nil {
		return err
	}
	return s.clearRemoval(ctx, name)
}

// grow enlarges a cloned zvol to size, and returns its volsize; the XFS inside is grown at its
// next mount (propGrow).
func (s *Store) grow(ctx context.Context, ds string, size uint64) (uint64, error) {
	row, err := s.zfs.Get(ctx, ds, "volsize")
	if err != nil {
		return 0, mapErr(err)
	}
	cur := row.Uint("volsize")
	if size < cur {
		return 0, fmt.Errorf("%w: size %d is smaller than the golden's %d bytes; a clone can only grow", driver.ErrInvalid, size, cur)
	}
	props := zfsutil.Props{propState: "ready"}
	if size > cur {
		cur = roundUp(size, 8192)
		props["volsize"] = strconv.FormatUint(cur, 10)
		props[propGrow] = driver.MetaYes
	}
	return cur, mapErr(s.zfs.Set(ctx, ds, props))
}

func roundUp(n, to uint64) uint64 { return (n + to - 1) / to * to }

// createEmpty makes a fresh sparse zvol with a new XFS, or a fresh filesystem dataset; props must
// carry zgolden:state=creating semantics (the caller marks it ready).
func (s *Store) createEmpty(ctx context.Context, name, ds string, kind driver.Kind, size uint64, props zfsutil.Props) error {
	log := s.log.WithFields(logrus.Fields{"volume": name, "dataset": ds})
	p := zfsutil.Props{propState: "creating"}
	for k, v := range props {
		p[k] = v
	}
	p[propState] = "creating"
	if kind == driver.KindFS {
		p["mountpoint"] = "legacy"
		if size > 0 {
			p["refquota"] = strconv.FormatUint(size, 10)
		}
		err := s.zfs.CreateFilesystem(ctx, ds, p)
		s.cleanupLate(name, ds, err, log)
		return mapErr(err)
	}
	if size == 0 {
		size = s.cfg.DefaultSize
	}
	p["volblocksize"] = s.cfg.Volblocksize
	if err := s.zfs.CreateVolume(ctx, ds, roundUp(size, 8192), p); err != nil {
		s.cleanupLate(name, ds, err, log)
		return mapErr(err)
	}
	dev, err := s.zfs.WaitDevice(ctx, ds, s.cfg.DeviceTimeout)
	if err == nil {
		err = xfsutil.Mkfs(ctx, dev, "zgolden")
	}
	if err != nil {
		// A mkfs.xfs that the kernel keeps past the deadline (its writes queued behind a busy
		// pool) holds the zvol open, and a destroy now would fail as busy and leave the
		// dataset to the next start: it is destroyed once the mkfs has exited.
		if !s.cleanupLate(name, ds, err, log) {
			s.rollback(ctx, log, name, ds)
		}
		return mapErr(err)
	}
	return nil
}

// Remove implements driver.Backend. With a record directory it records the removal and returns;
// the dataset is destroyed in the background (removal.go). Without one the volume goes to the
// trash (see trash.go), which takes the same time whatever it holds, and is destroyed from
// there; should the rename fail (the trash gone, a name too long for it), Remove destroys the
// volume itself.
func (s *Store) Remove(ctx context.Context, v driver.Volume) error {
	if s.cfg.RecordDir != "" {
		return s.removeLater(v.Name)
	}
	if handled, err := s.removeClaimed(ctx, v.Name); handled {
		return err
	}
	ds := s.volDataset(v.Name)
	dev := held.take(ds)
	err := s.trashVolume(ctx, ds, v.Name, dev)
	switch {
	case errors.Is(err, zfsutil.ErrBusy):
		if dev != nil {
			held.hold(ds, dev)
		}
		return busy(err, ds)
	case err != nil && ctx.Err() == nil:
		// "Does not exist" can be the volume (already gone: destroy says so too) or the trash
		// (destroyed by hand): destroying in place is right for both, and for a name too long.
		s.log.WithError(err).WithFields(logrus.Fields{"volume": v.Name, "dataset": ds}).Warn("could not move the volume to the trash; destroying it in place")
		s.closeDevice(dev, ds)
		err = s.destroyVolume(ctx, ds)
	case err != nil && dev != nil:
		held.hold(ds, dev)
	}
	if err != nil {
		return mapErr(err)
	}
	s.setGrowing(v.Name, false)
	return nil
}

// Mount implements driver.Backend.
func (s *Store) Mount(ctx context.Context, v driver.Volume, target string) error {
	ds := s.dsOf(v.Name)
	if v.Kind == driver.KindFS {
		return mapErr(xfsutil.MountFS(ctx, "zfs", ds, target, nil))
	}
	// A device Unmount held goes back to being the mount's: closing it now is the zvol's last
	// close, with its wait for the pool (held.go). Without it, a remount on a nearly full pool
	// failed with ENOSPC in XFS's log recovery (hostile TestSpaceExhaustion in the guest), most
	// likely because what that close syncs still counts against the pool's space.
	s.closeDevice(held.take(ds), ds)
	t0 := time.Now()
	if pm := s.premountOf(ds); pm != "" && !s.isGrowing(v.Name) {
		log := s.log.WithFields(logrus.Fields{"volume": v.Name, "dataset": ds})
		t1 := time.Now()
		if s.bindEarly(pm, target, log) {
			log.WithFields(logrus.Fields{"find_took": t1.Sub(t0).Round(time.Microsecond).String(), "bind_took": time.Since(t1).Round(time.Microsecond).String()}).Debug("bound the early mount")
			return nil
		}
	}
	dev, err := s.deviceOf(ctx, v.Name, ds)
	if err != nil {
		return err
	}
	if err := xfsutil.Mount(ctx, dev, target, xfsutil.MountOptions(s.cfg.Discard)); err != nil {
		if err = mapErr(err); errors.Is(err, driver.ErrNoSpace) {
			// XFS writes its log at mount; a pool with no space left refuses that write (zfs
			// 2.4 in the guest, where 2.1 still let it through).
			err = fmt.Errorf("%w; the pool has no space left for XFS to write its log: free space (remove volumes, `zgolden golden reclaim`) and mount again; the volume's data is intact", err)
		}
		return err
	}
	if s.isGrowing(v.Name) {
		if err = xfsutil.Grow(ctx, target); err == nil {
			err = s.zfs.Inherit(ctx, ds, propGrow)
		}
		if err == nil {
			s.setGrowing(v.Name, false)
		}
	}
	if err != nil {
		if uerr := xfsutil.UnmountRetry(ctx, target, 5); uerr != nil {
			s.log.WithError(uerr).WithField("volume", v.Name).Error("could not unmount after a failed grow")
		}
		return mapErr(err)
	}
	return nil
}

// Unmount implements driver.Backend. A block volume's XFS stays mounted at an early mount
// (premount.go, keepMounted), so the unmount writes nothing; where that cannot be done, the
// XFS is unmounted with the device held (held.go).
func (s *Store) Unmount(ctx context.Context, v driver.Volume, target string) error {
	ds := s.dsOf(v.Name)
	if v.Kind == driver.KindBlock {
		log := s.log.WithFields(logrus.Fields{"volume": v.Name, "dataset": ds})
		t0 := time.Now()
		if s.keepMounted(ds, target, log) {
			log.WithField("took", time.Since(t0).Round(time.Microsecond).String()).Debug("kept the XFS mounted early")
			return nil
		}
		s.holdDevice(v.Name, ds, target)
	}
	err := xfsutil.UnmountRetry(ctx, target, 10)
	if err != nil {
		// Still mounted, so the mount keeps the device; a held one would only be a second copy.
		s.closeDevice(held.take(ds), ds)
	}
	return mapErr(err)
}

// Close stops the trash and spare workers, waiting for their commands in progress until ctx is
// done, and
// closes the devices Unmount held. Removed volumes it did not destroy are destroyed at the next
// start.
func (s *Store) Close(ctx context.Context) error {
	err := s.stopTrash(ctx)
	err = errors.Join(err, s.stopSettling(ctx))
	err = errors.Join(err, s.stopWorker(ctx))
	defer s.lock.Release()                  // last: after the records are closed
	defer func() { _ = s.closeRecords() }() // after the workers, which write records
	for ds, f := range held.under(s.cfg.Parent) {
		s.closeDevice(f, ds)
	}
	// Early mounts of spares go with the process that made them (premount.go): nothing stays
	// mounted that Docker did not ask for, and the next start mounts them again in the
	// background. A volume claimed and not yet mounted mounts its device as usual then.
	if pm, perr := s.premounts(); perr == nil {
		for ds, p := range pm {
			if uerr := xfsutil.UnmountRetry(ctx, p, 5); uerr != nil {
				err = errors.Join(err, fmt.Errorf("unmount the early mount %s of %s: %w", p, ds, uerr))
				continue
			}
			_ = os.Remove(p)
		}
	}
	return err
}

// Mounted implements driver.Backend.
func (s *Store) Mounted(target string) (bool, error) {
	return xfsutil.IsMountpoint(target)
}

// Usage implements driver.Backend.
func (s *Store) Usage(ctx context.Context, v driver.Volume) (driver.Usage, error) {
	ds := s.dsOf(v.Name)
	row, err := s.zfs.Get(ctx, ds, "volsize", "refquota", "logicalreferenced", "written", "referenced")
	if errors.Is(err, zfsutil.ErrNotFound) && ds != s.dsOf(v.Name) { // renamed meanwhile
		ds = s.dsOf(v.Name)
		row, err = s.zfs.Get(ctx, ds, "volsize", "refquota", "logicalreferenced", "written", "referenced")
	}
	if err != nil {
		return driver.Usage{}, mapErr(err)
	}
	u := driver.Usage{
		Size: row.Uint("volsize"), Logical: row.Uint("logicalreferenced"),
		Written: row.Uint("written"), Referenced: row.Uint("referenced"),
	}
	if v.Kind == driver.KindBlock {
		u.Device = zfsutil.DevicePath(ds)
	} else {
		u.Size = row.Uint("refquota")
	}
	return u, nil
}

// Status implements driver.Backend.
func (s *Store) Status(ctx context.Context) (driver.Status, error) {
	row, err := s.zfs.Get(ctx, s.cfg.Parent, "available", "used")
	if err != nil {
		return driver.Status{}, mapErr(err)
	}
	pool := zfsutil.PoolOf(s.cfg.Parent)
	z := &driver.ZFSStatus{
		Parent: s.cfg.Parent, Pool: pool,
		ZFSModule: s.versions.Module, ZFSUserland: s.versions.Userland, ZFSProven: strings.Join(s.versions.Proven, ","),
		DevicesHeld:     held.count(s.cfg.Parent),
		CleanupsPending: s.tomb.count(), CloneSyncTasks: s.cloneSyncTasks(),
	}
	z.SparesMaking, z.CreatesWaiting = s.awaited("")
	z.SettlesPending = int(s.settlingInit().pending.Load())
	if n, err := s.zfs.DDTEntries(ctx, pool); err == nil {
		z.DDTEntries = &n
	}
	kept, mounted := 0, 0
	if pm, err := s.premounts(); err == nil {
		for ds := range pm {
			// A claimed spare keeps its early mount when it is renamed to its volume's name.
			if inside(s.spareRoot(), ds) {
				mounted++
			} else {
				kept++
			}
		}
	}
	if txgs, err := zfsutil.TxgSyncs(pool); err == nil {
		// What every zfs clone, rename and destroy waits on (see slow.go).
		worst, last := syncStats(txgs, 10)
		l, w := last.Seconds(), worst.Seconds()
		z.TxgSyncLastSeconds, z.TxgSyncMax10Seconds = &l, &w
	}
	return driver.Status{
		AvailableBytes: row.Uint("available"), UsedBytes: row.Uint("used"), KeptMounted: kept, SparesReady: s.sparesReady(), SparesMounted: mounted, ClaimsPending: s.claimsPending(),
		// Removed volumes not destroyed yet still hold their space (see trash.go).
		RemovedPending: s.trashPending(),
		ZFSStatus:      z,
	}, nil
}

// Space implements driver.Backend: what the parent dataset can still take (the pool's free
// space, less any quota above it) of the pool's whole usable capacity.
func (s *Store) Space(ctx context.Context) (driver.Space, error) {
	row, err := s.zfs.Get(ctx, s.cfg.Parent, "available")
	if err != nil {
		return driver.Space{}, mapErr(err)
	}
	pool, err := s.zfs.Get(ctx, zfsutil.PoolOf(s.cfg.Parent), "available", "used")
	if err != nil {
		return driver.Space{}, mapErr(err)
	}
	return driver.Space{Available: row.Uint("available"), Total: pool.Uint("available") + pool.Uint("used")}, nil
}

// DefaultParent picks POOL/zgolden when ZFS is usable and exactly one pool is imported, so
// `make run` on a ZFS host needs no flags. It returns "" when there is no single obvious pool.
func DefaultParent(ctx context.Context) string {
	if _, err := exec.LookPath("zpool"); err != nil {
		return ""
	}
	if _, err := os.Stat("/dev/zfs"); err != nil {
		return ""
	}
	pools, err := zfsutil.New(logrus.NewEntry(logrus.StandardLogger())).Pools(ctx)
	if err != nil || len(pools) != 1 {
		return ""
	}
	return pools[0] + "/zgolden"
}

// deviceOf returns the block device of volume name, held in ds. A claimed spare's device is known
// from when it was made, and stays the same while the finisher renames the spare.
func (s *Store) deviceOf(ctx context.Context, name, ds string) (string, error) {
	if c := s.claimOf(name); c != nil && c.dev != "" {
		if n := zfsutil.ZvolName(c.dev); n == c.Dataset || n == s.volDataset(name) {
			return c.dev, nil
		}
	}
	return s.zfs.WaitDevice(ctx, ds, s.cfg.DeviceTimeout)
}
