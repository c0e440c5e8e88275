// Package driver is zgolden's volume state machine: it validates requests, serialises them per
// volume, counts mounts by caller ID, and rebuilds its state at start-up from the backend's
// durable metadata and the kernel's mount table.
package driver

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/moby/locker"
	"github.com/sirupsen/logrus"
	"github.com/zgolden/zgolden/internal/fault"
)

// Config is the driver's configuration, validated by New.
type Config struct {
	Backend Backend
	// MountRoot holds one mountpoint directory per volume, MountRoot/NAME. For a managed plugin it
	// must be under the plugin's propagated mount (Docker confines plugin mounts to it).
	MountRoot string
	// StateDir holds the mount-reference files; see refStore.
	StateDir string
	// DefaultSize is the size of a volume created without -o size and without a golden.
	DefaultSize uint64
	// ImportWait is how long a Create for a project whose golden is being imported waits for the
	// import before it fails with a retryable error. Docker gives Create 2 minutes in all.
	ImportWait time.Duration
	// LegacyGoldens, if set, is a directory pattern such as /srv/golden/{project}: a Create for a
	// project with no golden but with that directory starts importing it in the background.
	LegacyGoldens string
	// LegacyRemove deletes a legacy golden directory once its import is verified and complete.
	LegacyRemove bool
	// Reserve is free space that new volumes, imports and promotions leave alone (reserve.go).
	Reserve Reserve
	// Holders, if set, names the containers that use a volume as the Docker engine sees them,
	// for busy errors (a volume plugin is never told). It is bounded to 5 seconds a call.
	Holders func(ctx context.Context, volume string) ([]string, error)
	// Active, if set, says whether a container that may hold a mount of the volume (any state
	// but exited or dead) uses it, as the Docker engine sees it. The driver asks it, after a
	// start and in Remove, about a mounted volume whose references the previous process saved:
	// a crash in Unmount leaves one, Docker never repeats the Unmount, and without the question
	// that reference would pin the volume for good (see recheckRefs).
	Active func(ctx context.Context, volume string) (bool, error)
	// Faults crashes the process at a named step, for crash tests; nil in production.
	Faults *fault.Injector
	Log    *logrus.Entry
}

// Driver serves the Docker volume API and the admin commands.
//
// Lock rules:
//   - locks (per volume name) is held for the whole of Create, Remove, Mount, Unmount and Promote
//     of that volume, so no two operations on one name interleave, while different names proceed
//     in parallel.
//   - projects (per golden project) is held for the whole of Promote, Import, Reclaim,
//     RemoveGolden and Receive of that project, and for the checks and holds at the start of an
//     Export (not while its bytes are written: the holds keep its snapshots). Create does not
//     take it: a generation appears atomically (a
//     ZFS snapshot or a rename), so a Create racing a promotion clones the old or the new
//     generation, never a half-made one. Creates for a project whose import is running wait on
//     the import instead (see Config.ImportWait).
//   - mu guards the vols, imports, receiving and loadedRefs maps only, and is never held across a backend call or I/O;
//     nor is spaceMu, which guards the reserve's cached read of free space.
//   - Order: a volume lock before a project lock before mu; never the reverse. A fork (Create
//     with -o from=) holds two volume locks, its own name's and its source's, taken in name
//     order; nothing else holds two.
//   - A busy error asks Docker which containers use the volume (Config.Holders) under the
//     volume's lock: that query is bounded to 5 seconds and takes no lock of zgolden's. So is
//     the question whether references a crash left are live (Config.Active, dropStaleRefs),
//     asked under the volume's lock by Remove and by the rechecks after a start.
type Driver struct {
	cfg      Config
	backend  Backend
	log      *logrus.Entry
	refs     refStore
	locks    *locker.Locker
	projects *locker.Locker

	mu      sync.Mutex
	vols    map[string]*volState
	imports map[string]*importState
	// receiving names the projects a Receive is writing into: a second one is refused at once
	// rather than queued behind the project lock for as long as the first stream lasts.
	receiving map[string]bool
	// loadedRefs holds, per mounted volume, the mount references the previous process saved,
	// until Docker says whether they are live (recheckRefs).
	loadedRefs map[string]map[string]struct{}

	// spaceMu guards the last read of the backend's space (reserve.go); never held across it.
	spaceMu sync.Mutex
	space   Space
	spaceAt time.Time
}

type volState struct {
	Volume
	ids map[string]struct{} // mount caller IDs; the filesystem is mounted while this is non-empty
}

// New validates cfg, then rebuilds the driver's state: volumes from the backend, mount references
// from StateDir, mounted state from the kernel; it repairs whatever a crash left inconsistent.
func New(ctx context.Context, cfg Config) (*Driver, error) {
	if cfg.Backend == nil {
		return nil, errors.New("driver: no backend configured")
	}
	if !filepath.IsAbs(cfg.MountRoot) || !filepath.IsAbs(cfg.StateDir) {
		return nil, fmt.Errorf("driver: mount root %q and state dir %q must be absolute paths", cfg.MountRoot, cfg.StateDir)
	}
	if cfg.DefaultSize == 0 {
		cfg.DefaultSize = 100 << 30
	}
	if cfg.ImportWait == 0 {
		cfg.ImportWait = 90 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = logrus.NewEntry(logrus.StandardLogger())
	}
	for _, dir := range []string{cfg.MountRoot, cfg.StateDir} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("driver: %w", err)
		}
	}
	d := &Driver{
		cfg:      cfg,
		backend:  cfg.Backend,
		log:      cfg.Log,
		refs:     refStore{dir: filepath.Join(cfg.StateDir, "mounts")},
		locks:    locker.New(),
		projects: locker.New(),
		vols:     map[string]*volState{},
		imports:  map[string]*importState{},

		receiving:  map[string]bool{},
		loadedRefs: map[string]map[string]struct{}{},
	}
	if err := d.recover(ctx); err != nil {
		return nil, err
	}
	if d.cfg.Active != nil && len(d.loadedRefs) > 0 {
		go d.recheckRefs(ctx)
	}
	return d, nil
}

// recover reconciles three sources of truth after a restart:
//   - the backend's volumes (authoritative for what exists);
//   - saved mount references (which callers hold a volume);
//   - the kernel's mount table (what is mounted).
//
// References of an unmounted volume are dropped: the host rebooted, or the plugin died between
// unmounting a volume for its last caller and saving that. A mounted volume with no references
// is unmounted: the plugin died between mounting a volume and saving its first reference
// (Docker saw that Mount fail), or the reference file was lost.
func (d *Driver) recover(ctx context.Context) error {
	vols, err := d.backend.Load(ctx)
	if err != nil {
		return fmt.Errorf("load volumes from the %s backend: %w", d.backend.Name(), err)
	}
	saved, unreadable, err := d.refs.loadAll()
	if err != nil {
		return fmt.Errorf("load mount references from %s: %w", d.refs.dir, err)
	}
	for name := range unreadable {
		saved[name] = nil // dropped below, or stops the start, by whether the volume is mounted
	}
	for _, v := range vols {
		st := &volState{Volume: v, ids: saved[v.Name]}
		if st.ids == nil {
			st.ids = map[string]struct{}{}
		}
		delete(saved, v.Name)
		target := d.mountpoint(v.Name)
		mounted, err := d.backend.Mounted(target)
		if err != nil {
			return err
		}
		log := d.log.WithFields(logrus.Fields{"volume": v.Name, "source": v.Source})
		if rerr := unreadable[v.Name]; rerr != nil {
			if mounted { // which containers hold it is lost; unmounting it could cut one off
				return fmt.Errorf("%w; the volume is mounted at %s: stop the containers that use it, unmount it, delete that file and start again", rerr, target)
			}
			// What a host crash can leave of a file written without fsync (refs.go).
			log.WithError(rerr).Warn("dropping unreadable mount references of a volume that is not mounted (host crash)")
			if err := d.refs.save(v.Name, nil); err != nil {
				return err
			}
		}
		if len(st.ids) > 0 && mounted {
			// Possibly what a crash inside Unmount left (staleRefs); Docker is asked again
			// until it can tell (recheckRefs).
			d.loadedRefs[v.Name] = copyIDs(st.ids)
		}
		switch {
		case len(st.ids) > 0 && !mounted:
			log.WithField("ids", len(st.ids)).Warn("volume has mount references but is not mounted (host reboot or interrupted mount); dropping them")
			st.ids = map[string]struct{}{}
			if err := d.refs.save(v.Name, st.ids); err != nil {
				return err
			}
		case len(st.ids) == 0 && mounted:
			log.Warn("volume is mounted but no container holds it (interrupted mount or unmount); unmounting")
			if err := d.backend.Unmount(ctx, v, target); errors.Is(err, ErrBusy) {
				// A process still uses it (an Unmount failed busy before the restart): one busy
				// volume must not stop the plugin from serving every other. It stays mounted;
				// Remove unmounts it, or reports it busy, and the next Mount reuses it.
				log.WithError(err).Warn("leaving the volume mounted: it is still busy")
			} else if err != nil {
				return fmt.Errorf("unmount %s left by an interrupted operation: %w", v.Name, err)
			}
		case mounted:
			log.WithField("ids", len(st.ids)).Info("volume still mounted")
		}
		d.vols[v.Name] = st
	}
	for name := range saved { // references of volumes that no longer exist
		if err := d.refs.save(name, nil); err != nil {
			return err
		}
	}
	d.log.WithFields(logrus.Fields{"backend": d.backend.Name(), "volumes": len(d.vols)}).Info("state recovered")
	return nil
}

func (d *Driver) mountpoint(name string) string { return filepath.Join(d.cfg.MountRoot, name) }

// Mount references a crash inside Unmount left.
//
// Docker never repeats an Unmount, so the reference of a container whose Unmount was cut short
// by a crash would hold its volume "mounted by 1 container" for good, and Remove would refuse
// it. The references of a mounted volume that the previous process saved (loadedRefs) are
// therefore suspect: once Docker says that no container still running, starting, paused or
// restarting uses the volume (Config.Active), they are dropped and the volume is unmounted if
// nothing else holds it. Docker is asked right after the start and then every refCheckEvery for
// refCheckFor (at the start the container may still be in its exit, with Docker waiting on the
// Unmount that failed), and by a Remove that finds only such references: Docker removes a
// volume only when no container references it. A reference taken since the start is never
// suspect, and without an answer from Docker nothing is dropped.
const (
	refCheckEvery = 10 * time.Second
	refCheckFor   = 3 * time.Minute
)

// recheckRefs asks Docker about the suspect references until none is left or refCheckFor has
// passed.
func (d *Driver) recheckRefs(ctx context.Context) {
	deadline := time.Now().Add(refCheckFor)
	for {
		d.mu.Lock()
		names := slices.Sorted(maps.Keys(d.loadedRefs))
		d.mu.Unlock()
		if len(names) == 0 || time.Now().After(deadline) {
			return
		}
		for _, name := range names {
			d.locks.Lock(name)
			if err := d.dropStaleRefs(ctx, name); err != nil {
				d.log.WithError(err).WithField("volume", name).Warn("could not drop the mount references a crash left")
			}
			d.locks.Unlock(name)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(refCheckEvery):
		}
	}
}

// dropStaleRefs drops name's suspect references when Docker says no live container uses it,
// and unmounts it when no reference is left. The caller holds name's lock.
func (d *Driver) dropStaleRefs(ctx context.Context, name string) error {
	d.mu.Lock()
	suspect := d.loadedRefs[name]
	st := d.vols[name]
	d.mu.Unlock()
	if len(suspect) == 0 || st == nil {
		d.forgetLoadedRefs(name)
		return nil
	}
	next := copyIDs(st.ids)
	for id := range suspect {
		delete(next, id)
	}
	if len(next) == len(st.ids) { // all of them released since
		d.forgetLoadedRefs(name)
		return nil
	}
	if !d.staleRefs(ctx, name) {
		return nil
	}
	log := d.log.WithFields(logrus.Fields{"volume": name, "ids": len(st.ids) - len(next)})
	log.Warn("Docker runs no container that uses the volume: dropping the mount references a crash in Unmount left")
	if len(next) == 0 {
		target := d.mountpoint(name)
		if mounted, err := d.backend.Mounted(target); err != nil {
			return err
		} else if mounted {
			if err := d.backend.Unmount(ctx, st.Volume, target); err != nil {
				return fmt.Errorf("unmount %s: %w", name, err)
			}
		}
	}
	if err := d.refs.save(name, next); err != nil {
		return err
	}
	d.mu.Lock()
	st.ids = next
	d.mu.Unlock()
	d.forgetLoadedRefs(name)
	return nil
}

func (d *Driver) forgetLoadedRefs(name string) {
	d.mu.Lock()
	delete(d.loadedRefs, name)
	d.mu.Unlock()
}

// staleRefs says whether Docker, asked within 5 seconds, runs no container that could hold a
// mount of volume. Without an answer the references stand: dropping a live one would unmount a
// running container's volume.
func (d *Driver) staleRefs(ctx context.Context, volume string) bool {
	if d.cfg.Active == nil {
		return false
	}
	actx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	active, err := d.cfg.Active(actx, volume)
	if err != nil {
		d.log.WithError(err).WithField("volume", volume).Info("cannot ask Docker whether the volume's mount references are live; keeping them")
		return false
	}
	return !active
}

func (d *Driver) lookup(name string) (*volState, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	st, ok := d.vols[name]
	return st, ok
}

func notFound(name string) error {
	return fmt.Errorf("volume %q: %w: no zgolden volume has that name (see `docker volume ls`)", name, ErrNotFound)
}

// Create makes the volume name from opts. Creating an existing volume with the same golden is a
// no-op, so Docker's retries of a slow Create succeed.
func (d *Driver) Create(ctx context.Context, name string, opts map[string]string) error {
	spec, err := ParseCreate(name, opts)
	if err != nil {
		return err
	}
	if spec.From != "" {
		return d.fork(ctx, spec)
	}
	d.locks.Lock(name)
	defer d.locks.Unlock(name)

	if st, ok := d.lookup(name); ok {
		if st.ForkOf != "" {
			return fmt.Errorf("volume %q: %w as a fork of %q; remove it first or choose another name", name, ErrExists, st.ForkOf)
		}
		if spec.Golden != st.Golden || spec.Kind != st.Kind {
			return fmt.Errorf("volume %q: %w with golden=%q type=%s; remove it first or choose another name", name, ErrExists, st.Golden, st.Kind)
		}
		return nil
	}
	if spec.Golden != "" {
		if err := d.waitImport(ctx, spec.Golden); err != nil {
			return err
		}
	}
	if spec.Size == 0 && spec.Golden == "" {
		spec.Size = d.cfg.DefaultSize
	}
	if err := d.checkReserve(ctx, "creating volume "+strconv.Quote(name)); err != nil {
		return err
	}
	start := time.Now()
	v, err := d.createOrImport(ctx, spec)
	if err != nil {
		return fmt.Errorf("create volume %q: %w", name, err)
	}
	d.cfg.Faults.Hit("create:before-reply")
	d.mu.Lock()
	d.vols[name] = &volState{Volume: v, ids: map[string]struct{}{}}
	d.mu.Unlock()
	d.log.WithFields(logrus.Fields{
		"volume": name, "source": v.Source, "golden": v.Golden, "generation": v.Generation,
		"cold_start": v.ColdStart, "took": time.Since(start).Round(time.Millisecond).String(),
	}).Info("volume created")
	return nil
}

// fork makes spec.Name from the current content of volume spec.From. It holds both names' locks,
// so the source can be neither removed nor unmounted while it is snapshotted; they are taken in
// name order (see the lock rules), so two forks that name each other cannot deadlock.
func (d *Driver) fork(ctx context.Context, spec Spec) error {
	first, second := spec.Name, spec.From
	if second < first {
		first, second = second, first
	}
	d.locks.Lock(first)
	defer d.locks.Unlock(first)
	d.locks.Lock(second)
	defer d.locks.Unlock(second)
	if st, ok := d.lookup(spec.Name); ok {
		if st.ForkOf != spec.From {
			return fmt.Errorf("volume %q: %w and is not a fork of %q; remove it first or choose another name", spec.Name, ErrExists, spec.From)
		}
		return nil // Docker's retry of a slow Create
	}
	src, ok := d.lookup(spec.From)
	if !ok {
		return fmt.Errorf("fork volume %q from %q: %w", spec.Name, spec.From, notFound(spec.From))
	}
	if err := d.checkReserve(ctx, "forking volume "+strconv.Quote(spec.From)); err != nil {
		return err
	}
	mountpoint := ""
	mounted, err := d.backend.Mounted(d.mountpoint(spec.From))
	if err != nil {
		return err
	}
	if mounted {
		mountpoint = d.mountpoint(spec.From)
	}
	start := time.Now()
	v, err := d.backend.Fork(ctx, src.Volume, mountpoint, spec)
	if err != nil {
		return fmt.Errorf("fork volume %q from %q: %w", spec.Name, spec.From, err)
	}
	d.mu.Lock()
	d.vols[spec.Name] = &volState{Volume: v, ids: map[string]struct{}{}}
	d.mu.Unlock()
	d.log.WithFields(logrus.Fields{
		"volume": spec.Name, "source": v.Source, "fork_of": spec.From, "frozen": mounted,
		"golden": v.Golden, "generation": v.Generation, "took": time.Since(start).Round(time.Millisecond).String(),
	}).Info("volume forked")
	return nil
}

// createOrImport creates the volume. With legacy goldens configured, a project without a golden
// whose legacy directory exists is imported first (in the background, waited for up to
// ImportWait), so that even the first sessions get clones rather than cold starts.
func (d *Driver) createOrImport(ctx context.Context, spec Spec) (Volume, error) {
	if d.cfg.LegacyGoldens == "" || spec.Golden == "" {
		return d.backend.Create(ctx, spec)
	}
	strict := spec
	strict.RequireGolden = true // find out, without making anything, whether a golden exists
	v, err := d.backend.Create(ctx, strict)
	if !errors.Is(err, ErrNoGolden) || !d.autoImport(spec.Golden, spec.Kind) {
		if errors.Is(err, ErrNoGolden) && !spec.RequireGolden {
			return d.backend.Create(ctx, spec) // no legacy directory either: a cold start
		}
		return v, err
	}
	if err := d.waitImport(ctx, spec.Golden); err != nil {
		return Volume{}, err
	}
	return d.backend.Create(ctx, spec)
}

// Remove destroys an unmounted volume. Removing a volume that does not exist succeeds, so a retry
// after a Remove whose reply was lost does not fail.
func (d *Driver) Remove(ctx context.Context, name string) error {
	if err := ValidateName(name); err != nil {
		return err
	}
	d.locks.Lock(name)
	defer d.locks.Unlock(name)
	st, ok := d.lookup(name)
	if !ok {
		return nil
	}
	if len(st.ids) > 0 {
		if err := d.dropStaleRefs(ctx, name); err != nil {
			return fmt.Errorf("remove volume %q: %w", name, err)
		}
		st, _ = d.lookup(name)
	}
	if n := len(st.ids); n > 0 {
		return d.busyWith(ctx, name, fmt.Errorf("volume %q: %w: mounted by %d container(s); stop or remove them first", name, ErrBusy, n))
	}
	target := d.mountpoint(name)
	mounted, err := d.backend.Mounted(target)
	if err != nil {
		return err
	}
	if mounted { // nothing holds it by our records; a leftover mount must not block the destroy
		if err := d.backend.Unmount(ctx, st.Volume, target); err != nil {
			return fmt.Errorf("remove volume %q: %w", name, err)
		}
	}
	d.cfg.Faults.Hit("remove:after-unmount")
	if err := d.backend.Remove(ctx, st.Volume); err != nil {
		return d.busyWith(ctx, name, fmt.Errorf("remove volume %q: %w", name, err))
	}
	d.cfg.Faults.Hit("remove:after-destroy")
	d.mu.Lock()
	delete(d.vols, name)
	d.mu.Unlock()
	if err := os.Remove(target); err != nil && !errors.Is(err, os.ErrNotExist) {
		d.log.WithError(err).WithField("volume", name).Warn("could not remove the empty mountpoint directory")
	}
	if err := d.refs.save(name, nil); err != nil {
		return err
	}
	d.log.WithFields(logrus.Fields{"volume": name, "source": st.Source}).Info("volume removed")
	return nil
}

// Mount mounts the volume for caller id and returns the mountpoint. The filesystem is mounted on
// the first caller and stays mounted until the last one unmounts. A repeated id counts once:
// `docker cp` reuses its container's ID.
func (d *Driver) Mount(ctx context.Context, name, id string) (string, error) {
	if err := ValidateName(name); err != nil {
		return "", err
	}
	if id == "" {
		return "", invalidf("mount of %q has no caller ID", name)
	}
	d.locks.Lock(name)
	defer d.locks.Unlock(name)
	st, ok := d.lookup(name)
	if !ok {
		return "", notFound(name)
	}
	target := d.mountpoint(name)
	if _, held := st.ids[id]; held {
		return target, nil
	}
	mounted, err := d.backend.Mounted(target)
	if err != nil {
		return "", err
	}
	next := copyIDs(st.ids)
	next[id] = struct{}{}
	// Mount first, save the reference second. If the plugin dies in between, Docker sees the
	// Mount fail (EOF or connection refused), never starts the container and never calls
	// Unmount for this ID; start-up then finds a mount with no reference and unmounts it (see
	// recover). Saving first would leave a reference to a container that never ran, pinning
	// the volume as "mounted by 1 container" for ever.
	if !mounted {
		if err := d.backend.Mount(ctx, st.Volume, target); err != nil {
			return "", fmt.Errorf("mount volume %q: %w", name, err)
		}
		d.cfg.Faults.Hit("mount:after-mount")
		d.log.WithFields(logrus.Fields{"volume": name, "source": st.Source, "mountpoint": target}).Info("volume mounted")
	}
	if err := d.refs.save(name, next); err != nil {
		if !mounted { // nobody else holds it: do not leave a mount without a reference
			if uerr := d.backend.Unmount(ctx, st.Volume, target); uerr != nil {
				d.log.WithError(uerr).WithField("volume", name).Error("could not unmount after failing to save the mount reference; it is unmounted at the next start or Remove")
			}
		}
		return "", fmt.Errorf("mount volume %q: save its mount reference: %w", name, err)
	}
	d.mu.Lock()
	st.ids = next
	d.mu.Unlock()
	return target, nil
}

// Unmount releases caller id's hold on the volume and unmounts it when no caller is left. An
// unknown id or volume is a no-op: Docker only unmounts after a successful mount, and a repeated
// Unmount must not take the mount away from another container (moby #17585).
func (d *Driver) Unmount(ctx context.Context, name, id string) error {
	if err := ValidateName(name); err != nil {
		return err
	}
	d.locks.Lock(name)
	defer d.locks.Unlock(name)
	st, ok := d.lookup(name)
	if !ok {
		return nil
	}
	if _, held := st.ids[id]; !held {
		d.log.WithFields(logrus.Fields{"volume": name, "id": id}).Debug("unmount for an ID that holds no mount; ignored")
		return nil
	}
	next := copyIDs(st.ids)
	delete(next, id)
	target := d.mountpoint(name)
	var unmountErr error
	if len(next) == 0 {
		mounted, err := d.backend.Mounted(target)
		if err != nil {
			return err
		}
		if mounted {
			if err := d.backend.Unmount(ctx, st.Volume, target); err != nil {
				// The caller's hold is released all the same: Docker ignores a failed Unmount
				// (the container is gone) and never sends it again, so keeping the ID would pin
				// the volume as "mounted by 1 container" for ever. The filesystem stays mounted
				// (never lazily detached); Remove unmounts it, or reports it busy, and the next
				// Mount reuses it.
				unmountErr = d.busyWith(ctx, name, fmt.Errorf("unmount volume %q: %w", name, err))
			} else {
				d.log.WithFields(logrus.Fields{"volume": name, "source": st.Source}).Info("volume unmounted")
			}
		}
	}
	if err := d.refs.save(name, next); err != nil {
		return errors.Join(unmountErr, err)
	}
	d.mu.Lock()
	st.ids = next
	d.mu.Unlock()
	return unmountErr
}

func copyIDs(ids map[string]struct{}) map[string]struct{} {
	out := make(map[string]struct{}, len(ids)+1)
	for id := range ids {
		out[id] = struct{}{}
	}
	return out
}

// Path returns the mountpoint of a mounted volume, or "" when it is not mounted.
func (d *Driver) Path(name string) (string, error) {
	if err := ValidateName(name); err != nil {
		return "", err
	}
	st, ok := d.lookup(name)
	if !ok {
		return "", notFound(name)
	}
	d.mu.Lock()
	n := len(st.ids)
	d.mu.Unlock()
	if n == 0 {
		return "", nil
	}
	return d.mountpoint(name), nil
}

// Info is a volume as Get and List report it.
type Info struct {
	Volume
	Mountpoint string // set while mounted
	Mounts     int    // callers holding the volume
	Usage      *Usage // live space, from Get only
}

func (d *Driver) info(st *volState) Info {
	d.mu.Lock()
	defer d.mu.Unlock()
	in := Info{Volume: st.Volume, Mounts: len(st.ids)}
	if in.Mounts > 0 {
		in.Mountpoint = d.mountpoint(st.Name)
	}
	return in
}

// Get returns one volume with its live usage.
func (d *Driver) Get(ctx context.Context, name string) (Info, error) {
	if err := ValidateName(name); err != nil {
		return Info{}, err
	}
	st, ok := d.lookup(name)
	if !ok {
		return Info{}, notFound(name)
	}
	in := d.info(st)
	u, err := d.backend.Usage(ctx, st.Volume)
	if err != nil {
		// Get must keep working for `docker volume inspect` even when usage cannot be read.
		d.log.WithError(err).WithField("volume", name).Warn("could not read volume usage")
	} else {
		in.Usage = &u
	}
	return in, nil
}

// List returns every volume, sorted by name, without usage (List is called often by Docker).
func (d *Driver) List() []Info {
	d.mu.Lock()
	states := make([]*volState, 0, len(d.vols))
	for _, st := range d.vols {
		states = append(states, st)
	}
	d.mu.Unlock()
	out := make([]Info, 0, len(states))
	for _, st := range states {
		out = append(out, d.info(st))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Backend returns the backend's name.
func (d *Driver) Backend() string { return d.backend.Name() }

// busyWith adds to a busy error the containers that use volume name, as the Docker engine lists
// them, when Config.Holders is set and Docker answers within 5 seconds.
func (d *Driver) busyWith(ctx context.Context, name string, err error) error {
	if d.cfg.Holders == nil || !errors.Is(err, ErrBusy) {
		return err
	}
	hctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	names, herr := d.cfg.Holders(hctx, name)
	if herr != nil || len(names) == 0 {
		if herr != nil {
			d.log.WithError(herr).WithField("volume", name).Debug("could not ask Docker which containers use the volume")
		}
		return err
	}
	return fmt.Errorf("%w; Docker lists these containers using it: %s", err, strings.Join(names, ", "))
}
