// Package reflinkstore is zgolden's backend for hosts without ZFS: each golden generation is a
// sparse image file holding XFS, and each volume is a reflink (FICLONE) copy of one, mounted
// through a loop device.
//
// Layout under the configured root:
//
//	ROOT/.zgolden-reflink                marker: this root is zgolden's, and which mode it uses
//	ROOT/.zgolden-reflink.records        claims and removals not yet synced (records.go)
//	ROOT/store.img                       only when ROOT cannot reflink: a sparse XFS (reflink=1)
//	                                     file, loop-mounted at ROOT/store
//	ROOT/store/volumes/NAME.img          one volume
//	ROOT/store/goldens/PROJECT/genN.img  one generation of a project's golden
//	ROOT/store/.../.tmp-*.img            an image being made, renamed into place when complete
//	ROOT/work/import-PROJECT-N           where an import mounts its new generation while copying
//
// The durable state is the image files and their user.zgolden.* extended attributes, the
// counterpart of the ZFS backend's user properties; the record file only carries a claim or a
// removal from its reply to the sync of its directory (records.go). Every image is made
// under a temporary name, given its attributes and renamed into place, so a crash leaves either a
// complete image or a temporary one that Load deletes (or, for a complete generation, renames).
//
// Reflinks have no parent and child: a generation can be deleted while its clones live on, and
// they keep the blocks they share. Dependents are still derived from the volumes' attributes, so
// that golden ls, reclaim and golden rm behave as they do on ZFS.
package reflinkstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/internal/fault"
	"github.com/zgolden/zgolden/internal/proclock"
	"github.com/zgolden/zgolden/xfsutil"
)

const (
	markerName    = ".zgolden-reflink"
	lockName      = ".zgolden-reflink.lock"
	storeDirName  = "store"
	storeFileName = "store.img"
	storeFileTemp = ".store.img.tmp"
	workDirName   = "work"
	probePrefix   = ".zgolden-probe-" // xfsutil.ReflinkSupported's probe files

	// modeNative keeps images directly in ROOT/store, on ROOT's own reflink-capable filesystem.
	modeNative = "native"
	// modeFile keeps them in ROOT/store.img, an XFS the store formats and loop-mounts itself.
	modeFile = "file"
)

// Config configures the reflink store.
type Config struct {
	// Root holds everything the store makes; nothing outside it is touched. When its filesystem
	// cannot reflink (ext4, tmpfs, XFS with reflink=0), the images live in ROOT/store.img.
	Root string
	// StoreSize is the size of ROOT/store.img when the store has to make one (default 100G). The
	// file is sparse: the host only allocates what volumes write. Read only when it is created.
	StoreSize uint64
	// Discard mounts volumes with -o discard, so space freed inside a volume punches holes in its
	// image instead of staying allocated for ever (docs/design-facts.md, "Volblocksize").
	Discard bool
	// DefaultSize is the size of a fresh volume made without -o size, and the least size of an
	// imported golden (default 100G; images are sparse).
	DefaultSize uint64
	// WorkDir is where imports mount their golden while copying (default ROOT/work).
	WorkDir string
	// Adopt lets the store use a root that already holds files it did not create.
	Adopt bool
	// Reserved are other directories of zgolden's own (the driver's mount root and state
	// directory) that may lie under Root: with the defaults, /var/lib/zgolden/mounts is the mount
	// root that any earlier `zgolden serve`, on ZFS too, made inside the default root.
	// checkForeign counts them as the store's own.
	Reserved []string
	// Spares is how many warm spares of each block project's newest generation to keep
	// reflinked and mounted ahead of their Create (spares.go); 0 makes none.
	Spares int
	// Faults crashes the process at a named step, for crash tests; nil in production.
	Faults *fault.Injector
	Log    *logrus.Entry
}

// Store is the reflink backend.
type Store struct {
	cfg       Config
	log       *logrus.Entry
	mode      string
	fsType    string // filesystem of the store directory, for status and messages
	storeDir  string // where volumes/ and goldens/ live; every path the store removes is below it
	storeFile string
	lock      *proclock.Lock // the root's; see lockRoot

	// gens is read-locked for the whole of a clone (pick a generation, reflink it, commit the
	// volume) and write-locked while a generation's dependents are checked and it is deleted. The
	// driver takes no project lock in Create, so without it Reclaim could delete a generation
	// between a Create's choice of it and its commit, leaving a volume that names a generation
	// that no longer exists.
	gens sync.RWMutex

	// unlinking counts the removed images whose unlink runs in the background (see Remove);
	// Close waits for them.
	unlinking   sync.WaitGroup
	unlinkCount atomic.Int64

	spares *spareSet // nil until Load starts the spare worker, and without spares

	recs recordSet // claims and removals not yet synced (records.go)
}

var _ driver.Backend = (*Store)(nil)

type marker struct {
	Owner   string `json:"owner"`
	Backend string `json:"backend"`
	Mode    string `json:"mode"`
}

// New opens the store at cfg.Root, creating it on first use. It decides once, by trying a
// reflink, whether the root's filesystem can hold the images itself or needs a store file, and
// records the decision in the root's marker. On later starts it remounts the store file if a host
// reboot unmounted it. It refuses a root that holds files it did not create, unless cfg.Adopt.
func New(ctx context.Context, cfg Config) (*Store, error) {
	if cfg.Log == nil {
		cfg.Log = logrus.NewEntry(logrus.StandardLogger())
	}
	if cfg.StoreSize == 0 {
		cfg.StoreSize = 100 << 30
	}
	if cfg.DefaultSize == 0 {
		cfg.DefaultSize = 100 << 30
	}
	switch {
	case cfg.Root == "" || !filepath.IsAbs(cfg.Root):
		return nil, fmt.Errorf("reflink store root %q must be an absolute directory path (pass --root /var/lib/zgolden, for example)", cfg.Root)
	case filepath.Clean(cfg.Root) == "/":
		return nil, errors.New("reflink store root must not be /: give zgolden a directory of its own, such as /var/lib/zgolden")
	case cfg.StoreSize < driver.MinSize || cfg.StoreSize > driver.MaxSize:
		return nil, fmt.Errorf("reflink store size %d is out of range: it must be between 512M and 1E", cfg.StoreSize)
	case cfg.DefaultSize < driver.MinSize || cfg.DefaultSize > driver.MaxSize:
		return nil, fmt.Errorf("default volume size %d is out of range: it must be between 512M and 1E", cfg.DefaultSize)
	case cfg.WorkDir != "" && !filepath.IsAbs(cfg.WorkDir):
		return nil, fmt.Errorf("work directory %q must be an absolute path", cfg.WorkDir)
	}
	if err := os.MkdirAll(cfg.Root, 0o700); err != nil {
		return nil, fmt.Errorf("create reflink store root: %w", err)
	}
	// Work with the real path: the kernel reports loop devices' backing files and mountpoints
	// with symlinks resolved, and the inside-the-root checks compare against them.
	root, err := filepath.EvalSymlinks(cfg.Root)
	if err != nil {
		return nil, fmt.Errorf("reflink store root: %w", err)
	}
	cfg.Root = root
	s := &Store{
		cfg:       cfg,
		log:       cfg.Log.WithField("backend", "reflink"),
		storeDir:  filepath.Join(root, storeDirName),
		storeFile: filepath.Join(root, storeFileName),
	}
	if err := s.open(ctx); err != nil {
		return nil, err
	}
	return s, nil
}

func (s *Store) open(ctx context.Context) error {
	mk, err := s.readMarker()
	if err != nil {
		return err
	}
	if mk == nil {
		if err := s.checkForeign(); err != nil {
			return err
		}
	}
	if err := s.lockRoot(); err != nil {
		return err
	}
	if err := s.openLocked(ctx, mk); err != nil {
		s.lock.Release()
		return err
	}
	return nil
}

// lockRoot locks ROOT/.zgolden-reflink.lock for the life of the process (internal/proclock), so
// a second zgolden on the same root (a managed plugin and a systemd service, say) fails at start
// instead of deleting the first one's half-made images as crash leftovers.
func (s *Store) lockRoot() error {
	lk, err := proclock.Take(filepath.Join(s.cfg.Root, lockName))
	var held *proclock.HeldError
	if errors.As(err, &held) {
		return fmt.Errorf("%w: another process (pid %d) is using the reflink store at %s; run one zgolden per root, and stop the other one first", driver.ErrBusy, held.Pid, s.cfg.Root)
	}
	if err != nil {
		return fmt.Errorf("lock the store: %w", err)
	}
	s.lock = lk
	return nil
}

func (s *Store) openLocked(ctx context.Context, mk *marker) error {
	if mk == nil {
		if err := s.removeLeftovers(); err != nil {
			return err
		}
	}
	var err error
	mode := ""
	switch {
	case mk != nil:
		mode = mk.Mode
	case exists(s.storeFile):
		mode = modeFile // made by a first start that died before writing the marker
	default:
		if err := s.checkStoreDirFree(); err != nil {
			return err
		}
		ok, err := xfsutil.ReflinkSupported(s.storeDir)
		if err != nil {
			return fmt.Errorf("probe whether %s can hold reflinks: %w", s.storeDir, err)
		}
		mode = modeFile
		if ok {
			mode = modeNative
		}
	}
	switch mode {
	case modeNative:
		err = s.openNative()
	case modeFile:
		err = s.openStoreFile(ctx, mk == nil)
	default:
		err = fmt.Errorf("%s names an unknown store mode %q; it was not written by this version of zgolden", filepath.Join(s.cfg.Root, markerName), mode)
	}
	if err != nil {
		return err
	}
	if mk == nil {
		if err := s.writeMarker(mode); err != nil {
			return err
		}
	}
	// The real path again: in file mode storeDir is now a mountpoint, which changes nothing, but
	// a store directory that is itself a symlink must be compared resolved.
	if s.storeDir, err = filepath.EvalSymlinks(s.storeDir); err != nil {
		return err
	}
	for _, dir := range []string{s.volumesDir(), s.goldensDir()} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return err
		}
	}
	if s.cfg.WorkDir == "" {
		s.cfg.WorkDir = filepath.Join(s.cfg.Root, workDirName)
	}
	if err := os.MkdirAll(s.cfg.WorkDir, 0o700); err != nil {
		return fmt.Errorf("create work directory: %w", err)
	}
	if s.cfg.WorkDir, err = filepath.EvalSymlinks(s.cfg.WorkDir); err != nil {
		return err
	}
	s.mode = mode
	if s.fsType, err = xfsutil.FSType(s.storeDir); err != nil {
		return err
	}
	s.log.WithFields(logrus.Fields{"root": s.cfg.Root, "mode": mode, "filesystem": s.fsType}).Info("reflink store open")
	return nil
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

func (s *Store) readMarker() (*marker, error) {
	path := filepath.Join(s.cfg.Root, markerName)
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var m marker
	if err := json.Unmarshal(data, &m); err != nil || m.Owner != "zgolden" || m.Backend != "reflink" {
		return nil, fmt.Errorf("%s is not a zgolden reflink store marker (%v); is this root used by something else?", path, err)
	}
	return &m, nil
}

func (s *Store) writeMarker(mode string) error {
	data, err := json.Marshal(marker{Owner: "zgolden", Backend: "reflink", Mode: mode})
	if err != nil {
		return err
	}
	path := filepath.Join(s.cfg.Root, markerName)
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(data, '\n'), 0o600); err != nil {
		return err
	}
	f, err := os.Open(tmp)
	if err == nil {
		err = f.Sync()
		f.Close()
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return xfsutil.SyncDir(s.cfg.Root)
}

// leftover reports whether name is what a first start that died early leaves in the root.
func leftover(name string) bool {
	return name == storeFileTemp || name == markerName+".tmp" || strings.HasPrefix(name, probePrefix)
}

// removeLeftovers clears what a first start that died early left in the root.
func (s *Store) removeLeftovers() error {
	entries, err := os.ReadDir(s.cfg.Root)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if leftover(e.Name()) {
			if err := os.Remove(filepath.Join(s.cfg.Root, e.Name())); err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
		}
	}
	return nil
}

// checkForeign refuses a root that holds anything the store would not have made, so a mistyped
// --root never mixes zgolden's images with someone else's files. It changes nothing.
func (s *Store) checkForeign() error {
	entries, err := os.ReadDir(s.cfg.Root)
	if err != nil {
		return err
	}
	reserved := map[string]bool{}
	for _, r := range s.cfg.Reserved {
		if rel, err := filepath.Rel(filepath.Clean(s.cfg.Root), filepath.Clean(r)); err == nil && rel != "." && !strings.HasPrefix(rel, "..") {
			reserved[strings.Split(rel, string(filepath.Separator))[0]] = true
		}
	}
	var foreign []string
	for _, e := range entries {
		switch n := e.Name(); {
		case n == storeDirName || n == storeFileName || n == workDirName || n == lockName || n == recordsName || leftover(n) || reserved[n] && e.IsDir():
		default:
			foreign = append(foreign, n)
		}
	}
	if len(foreign) > 0 && !s.cfg.Adopt {
		if len(foreign) > 5 {
			foreign = append(foreign[:5], "...")
		}
		return fmt.Errorf("reflink store root %s already holds %d entries zgolden did not create (%s); choose an empty or new directory, or pass --adopt to share it",
			s.cfg.Root, len(foreign), strings.Join(foreign, ", "))
	}
	return nil
}

// checkStoreDirFree makes sure ROOT/store is a plain directory on the root's filesystem before
// the first start decides the mode from it.
func (s *Store) checkStoreDirFree() error {
	if err := os.MkdirAll(s.storeDir, 0o700); err != nil {
		return err
	}
	m, err := xfsutil.MountedAt(s.storeDir)
	if err != nil {
		return err
	}
	if m != nil {
		return fmt.Errorf("%s is already a mount of %s that zgolden did not make; unmount it or choose another root", s.storeDir, m.Source)
	}
	return removeProbes(s.storeDir)
}

// removeProbes deletes probe files a crash left in dir.
func removeProbes(dir string) error {
	probes, err := filepath.Glob(filepath.Join(dir, probePrefix+"*"))
	if err != nil {
		return err
	}
	for _, p := range probes {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	return nil
}

func (s *Store) openNative() error {
	if err := s.checkStoreDirFree(); err != nil {
		return err
	}
	ok, err := xfsutil.ReflinkSupported(s.storeDir)
	if err != nil {
		return fmt.Errorf("probe whether %s can hold reflinks: %w", s.storeDir, err)
	}
	if !ok {
		fs, _ := xfsutil.FSType(s.storeDir)
		return fmt.Errorf("%s is on %s, which cannot make reflinks, but it could when zgolden first used this root: is the root's own filesystem not mounted yet, or was the root moved?", s.storeDir, fs)
	}
	return nil
}

// openStoreFile mounts ROOT/store.img at ROOT/store, making the file on the first start. A store
// already mounted (the plugin restarted, the host did not) is used as it is.
func (s *Store) openStoreFile(ctx context.Context, firstStart bool) error {
	m, err := xfsutil.MountedAt(s.storeDir)
	if err != nil {
		return err
	}
	if m != nil {
		l, err := xfsutil.LoopOf(m.Source)
		if err != nil {
			return err
		}
		if !l.Backs(s.storeFile) {
			return fmt.Errorf("%s is a mount of %s (backed by %q), not of the store file %s; unmount it", s.storeDir, m.Source, l.BackingFile, s.storeFile)
		}
		return nil
	}
	if err := os.MkdirAll(s.storeDir, 0o700); err != nil {
		return err
	}
	// Mounting over a non-empty directory would hide its files: they are images from a store
	// that ran in native mode, or not ours.
	if entries, err := os.ReadDir(s.storeDir); err != nil {
		return err
	} else if len(entries) > 0 {
		return fmt.Errorf("%s is not empty and is not the mounted store file; move its contents away before zgolden mounts %s over it", s.storeDir, s.storeFile)
	}
	if !exists(s.storeFile) {
		if !firstStart {
			return fmt.Errorf("the store file %s is missing: it held every volume and golden of this root; restore it, or move %s away to start afresh", s.storeFile, s.cfg.Root)
		}
		if err := s.createStoreFile(ctx); err != nil {
			return err
		}
	}
	// A loop device left attached to the store file (a crash inside mount) would be a second
	// writer of its XFS.
	if err := s.releaseLoops(s.storeFile); err != nil {
		return err
	}
	// nouuid: a copy of the store file (a restored backup next to the original) has the same
	// XFS UUID. discard: images the store deletes punch holes in the store file, so their space
	// goes back to the host's filesystem.
	if err := xfsutil.Mount(ctx, s.storeFile, s.storeDir, []string{"loop", "nouuid", "discard"}); err != nil {
		return fmt.Errorf("mount the store file %s at %s: %w", s.storeFile, s.storeDir, mapErr(err))
	}
	s.log.WithFields(logrus.Fields{"image": s.storeFile, "mountpoint": s.storeDir}).Info("mounted the store file")
	return nil
}

func (s *Store) createStoreFile(ctx context.Context) error {
	fs, _ := xfsutil.FSType(s.cfg.Root)
	log := s.log.WithFields(logrus.Fields{"image": s.storeFile, "size": s.cfg.StoreSize, "host_filesystem": fs})
	log.Info("the root's filesystem cannot make reflinks: creating a sparse XFS store file")
	tmp := filepath.Join(s.cfg.Root, storeFileTemp)
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	err = f.Truncate(int64(s.cfg.StoreSize))
	if err == nil {
		err = xfsutil.MkfsReflink(ctx, tmp, "zgoldenstore")
	}
	if err == nil {
		err = f.Sync()
	}
	f.Close()
	if err == nil {
		err = os.Rename(tmp, s.storeFile)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("create the store file %s: %w", s.storeFile, mapErr(err))
	}
	return xfsutil.SyncDir(s.cfg.Root)
}

// Close does what Stop does (its wait for the removals under way is bounded by ctx, as Stop's
// is), unmounts the store file when the store uses one and nothing in it is attached, and
// releases the root's lock. The plugin need not call it: a restarted store finds the file mounted
// and carries on. Tests and uninstallers call it so that nothing stays mounted. The store must not
// be used afterwards.
func (s *Store) Close(ctx context.Context) error {
	if err := s.Stop(ctx); err != nil {
		return err
	}
	if err := s.closeRecords(); err != nil {
		return err
	}
	if err := s.closeStoreFile(ctx); err != nil {
		return err
	}
	if s.lock != nil {
		s.lock.Release()
		s.lock = nil
	}
	return nil
}

// Stop is what a stopping plugin does: it stops the spare worker, lets the removals under way
// finish (their kept mount's unmount and their unlink) until ctx ends, and unmounts the kept
// mounts, as the ZFS store's Close does its early mounts: nothing stays mounted that Docker did
// not ask for, and a volume Docker still has mounted keeps its XFS through Docker's mount. The
// store file stays mounted, and the next start carries on. A kill -9 skips all this; the next
// start's Load repairs what it left.
func (s *Store) Stop(ctx context.Context) error {
	s.stopSpares()
	done := make(chan struct{})
	go func() { s.unlinking.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		s.log.Warn("removals still under way at the stop; the next start finishes them")
	}
	// What has settled is synced and its records deleted; the rest stay for the next start.
	s.stopSyncer()
	return s.closeKept(ctx)
}

func (s *Store) closeStoreFile(ctx context.Context) error {
	if s.mode != modeFile {
		return nil
	}
	m, err := xfsutil.MountedAt(s.storeDir)
	if err != nil || m == nil {
		return err
	}
	loops, err := s.loopsUnder(s.storeDir)
	if err != nil {
		return err
	}
	if len(loops) > 0 {
		devs := make([]string, len(loops))
		for i, l := range loops {
			devs[i] = l.Device + " (" + l.BackingFile + ")"
		}
		return fmt.Errorf("%w: images in the store are still attached: %s; unmount the volumes first", driver.ErrBusy, strings.Join(devs, ", "))
	}
	if err := xfsutil.UnmountRetry(ctx, s.storeDir, 10); err != nil {
		return mapErr(err)
	}
	return s.releaseLoops(s.storeFile)
}

// Name implements driver.Backend.
func (s *Store) Name() string { return "reflink" }

const imgExt = ".img"

func (s *Store) volumesDir() string { return filepath.Join(s.storeDir, "volumes") }
func (s *Store) goldensDir() string { return filepath.Join(s.storeDir, "goldens") }

// volumeImage is the only way a volume's path is built: from a validated name.
func (s *Store) volumeImage(name string) (string, error) {
	if err := driver.ValidateName(name); err != nil {
		return "", err
	}
	return filepath.Join(s.volumesDir(), name+imgExt), nil
}

// projectDir is the only way a project's path is built: from a validated name.
func (s *Store) projectDir(project string) (string, error) {
	if err := driver.ValidateProject(project); err != nil {
		return "", err
	}
	return filepath.Join(s.goldensDir(), project), nil
}

// checkInside refuses any path that is not strictly below the store directory, as written and
// with the symlinks of its directory resolved. Every unlink goes through it: nothing outside the
// root is ever removed, whatever a name or a planted symlink says.
func (s *Store) checkInside(path string) error {
	clean := filepath.Clean(path)
	if !strings.HasPrefix(clean, s.storeDir+"/") {
		return fmt.Errorf("refusing to remove %s: it is outside zgolden's store %s", path, s.storeDir)
	}
	dir, err := filepath.EvalSymlinks(filepath.Dir(clean))
	if err != nil {
		return err
	}
	if dir != s.storeDir && !strings.HasPrefix(dir, s.storeDir+"/") {
		return fmt.Errorf("refusing to remove %s: its directory resolves to %s, outside zgolden's store %s", path, dir, s.storeDir)
	}
	return nil
}

// removeFile unlinks one file of the store; a file already gone is not an error.
func (s *Store) removeFile(path string) error {
	if err := s.checkInside(path); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// mapErr turns system and xfsutil errors into the driver's, keeping the message.
func mapErr(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, driver.ErrNoSpace), errors.Is(err, driver.ErrBusy), errors.Is(err, driver.ErrExists),
		errors.Is(err, driver.ErrNotFound), errors.Is(err, driver.ErrInvalid):
		return err
	case errors.Is(err, xfsutil.ErrNoSpace), errors.Is(err, unix.ENOSPC), errors.Is(err, unix.EDQUOT):
		return noSpace(err)
	case errors.Is(err, xfsutil.ErrBusy), errors.Is(err, unix.EBUSY):
		return fmt.Errorf("%w: %v", driver.ErrBusy, err)
	case errors.Is(err, os.ErrExist):
		return fmt.Errorf("%w: %v", driver.ErrExists, err)
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("%w: %v", driver.ErrNotFound, err)
	}
	return err
}

// noSpace marks err as ErrNoSpace and says what to do about it.
func noSpace(err error) error {
	return fmt.Errorf("%w: %v; the store is full: remove unused volumes, reclaim old golden generations, or give the store more room (see `zgolden status`)", driver.ErrNoSpace, err)
}

// Space implements driver.Backend: the store's filesystem, and for a sparse store file the host's
// free space too, whichever is smaller (the file's free space is a promise the host must keep).
func (s *Store) Space(ctx context.Context) (driver.Space, error) {
	free, total, err := xfsutil.FreeSpace(s.storeDir)
	if err != nil {
		return driver.Space{}, err
	}
	if s.mode == modeFile {
		if hfree, _, err := xfsutil.FreeSpace(s.cfg.Root); err == nil {
			free = min(free, hfree)
		}
	}
	return driver.Space{Available: free, Total: total}, nil
}

// Status implements driver.Backend.
func (s *Store) Status(ctx context.Context) (driver.Status, error) {
	free, total, err := xfsutil.FreeSpace(s.storeDir)
	if err != nil {
		return driver.Status{}, err
	}
	r := &driver.ReflinkStatus{Root: s.cfg.Root, Store: s.storeDir, StoreMode: s.mode, Filesystem: s.fsType, SizeBytes: total}
	if s.mode == modeFile {
		r.StoreFile = s.storeFile
		var fst unix.Stat_t
		if err := unix.Stat(s.storeFile, &fst); err == nil {
			n := uint64(fst.Blocks) * 512
			r.StoreFileAllocatedBytes = &n
		}
		// The store file is sparse, so its free space is a promise the host's filesystem has to
		// keep: show what the host really has left.
		if hfree, _, err := xfsutil.FreeSpace(s.cfg.Root); err == nil {
			r.HostAvailableBytes = &hfree
		}
	}
	kept, err := s.keptMounts()
	if err != nil {
		return driver.Status{}, err
	}
	ready, spares := s.sparesReady(), 0
	for _, n := range ready {
		spares += n
	}
	return driver.Status{
		AvailableBytes: free, UsedBytes: total - free,
		// Removed images whose unlink has not finished still hold their space (see Remove).
		RemovedPending: int(s.unlinkCount.Load()),
		KeptMounted:    max(len(kept)-spares, 0), // a spare's XFS is kept mounted too
		SparesReady:    ready,
		SparesMounted:  spares,
		ClaimsPending:  s.claimsPending(),
		ReflinkStatus:  r,
	}, nil
}

// bounded gives cleanup work a context of its own: the caller's may be what expired, and a
// rollback or a thaw still deserves a bounded try.
func bounded(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), d)
}
