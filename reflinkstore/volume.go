package reflinkstore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/internal/retry"
	"github.com/zgolden/zgolden/xfsutil"
)

// Load implements driver.Backend. It repairs what a crash left, in an order where each step frees
// what the next needs: it unmounts imports left mounted in the work directory, detaches loop
// devices still attached to images but mounted nowhere, deletes temporary images (renaming a
// generation whose completion marker was set), and then returns every complete volume.
func (s *Store) Load(ctx context.Context) ([]driver.Volume, error) {
	if s.recs.done == nil {
		// Once, before the directories are read: after a crash the records are the truth.
		if err := s.recoverRecords(); err != nil {
			return nil, err
		}
		s.startSyncer()
	}
	if err := s.cleanWork(ctx); err != nil {
		return nil, err
	}
	if err := s.cleanKept(ctx); err != nil {
		return nil, err
	}
	if err := s.detachLeakedLoops(); err != nil {
		return nil, err
	}
	if err := s.cleanTemps(); err != nil {
		return nil, err
	}
	if exists(s.sparesDir()) {
		if err := s.cleanTempsIn(s.sparesDir(), false); err != nil {
			return nil, err
		}
	}
	if s.spares == nil {
		if err := s.startSpares(); err != nil {
			return nil, err
		}
	}
	entries, err := os.ReadDir(s.volumesDir())
	if err != nil {
		return nil, fmt.Errorf("list volumes in %s: %w", s.volumesDir(), err)
	}
	var vols []driver.Volume
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), imgExt)
		log := s.log.WithField("image", filepath.Join(s.volumesDir(), e.Name()))
		if !ok || !e.Type().IsRegular() || driver.ValidateName(name) != nil {
			log.Warn("ignoring a file in the volume directory that zgolden did not create")
			continue
		}
		v, m, err := s.readVolume(name)
		if err != nil {
			return nil, err
		}
		if m[attrKind] == "" || m[attrState] != stateReady {
			// Images reach this name only complete (see commit); this one was put here by hand.
			log.Warn("ignoring an image without zgolden's attributes; remove it by hand if it is not needed")
			continue
		}
		vols = append(vols, v)
	}
	return vols, nil
}

// readVolume reads a volume from its image and attributes.
func (s *Store) readVolume(name string) (driver.Volume, meta, error) {
	img, err := s.volumeImage(name)
	if err != nil {
		return driver.Volume{}, nil, err
	}
	fi, err := os.Stat(img)
	if err != nil {
		return driver.Volume{}, nil, mapErr(err)
	}
	m, err := readMeta(img)
	if err != nil {
		return driver.Volume{}, nil, err
	}
	v := driver.VolumeFromMeta(name, func(key string) string { return m[key] })
	v.Size, v.Source = uint64(fi.Size()), img
	return v, m, nil
}

// cleanWork unmounts imports that a crash left mounted in the work directory.
func (s *Store) cleanWork(ctx context.Context) error {
	mounts, err := xfsutil.MountsUnder(s.cfg.WorkDir)
	if err != nil {
		return err
	}
	for i := len(mounts) - 1; i >= 0; i-- {
		mp := mounts[i].Mountpoint
		if filepath.Dir(mp) != s.cfg.WorkDir || !strings.HasPrefix(filepath.Base(mp), "import-") {
			continue // not an import's mount: not ours to touch
		}
		s.log.WithField("mountpoint", mp).Warn("unmounting a golden left mounted by an interrupted import")
		if err := xfsutil.UnmountRetry(ctx, mp, 10); err != nil {
			return mapErr(err)
		}
		_ = os.Remove(mp)
	}
	return nil
}

// loopsUnder returns the loop devices attached to files below dir, each with BackingFile the
// file's path here.
//
// A device that an earlier instance of the managed plugin attached names its file relative to
// that instance's mount namespace, which died with it ("/reflink/store/volumes/v.img", say), so
// a path that is not below dir is checked by identity (xfsutil.Loop.Backs) against dir's files
// of the same name. dir is walked only when such a device exists.
func (s *Store) loopsUnder(dir string) ([]xfsutil.Loop, error) {
	loops, err := xfsutil.Loops()
	if err != nil {
		return nil, err
	}
	var out []xfsutil.Loop
	var byName map[string][]string
	for _, l := range loops {
		if strings.HasPrefix(l.BackingFile, dir+"/") {
			out = append(out, l)
			continue
		}
		if byName == nil {
			byName = map[string][]string{}
			err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
				if err == nil && d.Type().IsRegular() {
					byName[d.Name()] = append(byName[d.Name()], p)
				}
				return nil // a file removed meanwhile attaches nothing
			})
			if err != nil {
				return nil, err
			}
		}
		for _, p := range byName[filepath.Base(l.BackingFile)] {
			if l.Backs(p) {
				l.BackingFile, l.Deleted = p, false
				out = append(out, l)
				break
			}
		}
	}
	return out, nil
}

// detachLeakedLoops detaches loop devices attached to the store's images but mounted nowhere: a
// crash between attaching one and mounting it, or a loop attached by hand. They hold
// their image's blocks, and a second device on one image is a second writer of its XFS.
func (s *Store) detachLeakedLoops() error {
	loops, err := s.loopsUnder(s.storeDir)
	if err != nil {
		return err
	}
	for _, l := range loops {
		mps, err := xfsutil.LoopMountpoints(l.Device)
		if err != nil {
			return err
		}
		if len(mps) > 0 {
			continue // a volume still mounted across the restart
		}
		s.log.WithFields(logrus.Fields{"device": l.Device, "image": l.BackingFile}).Warn("detaching a loop device that a crash left attached")
		if _, err := xfsutil.DetachLoop(l.Device, l.BackingFile); err != nil {
			return err
		}
	}
	return nil
}

// releaseLoops detaches loop devices still attached to img. One that is mounted is reported as
// ErrBusy rather than pulled from under its mount. It then waits, briefly, for the kernel to finish
// tearing the devices down (it does so after their last close, asynchronously), so that a caller
// that goes on to delete the image or unmount the store finds nothing attached.
func (s *Store) releaseLoops(img string) error {
	loops, err := xfsutil.Loops()
	if err != nil {
		return err
	}
	for _, l := range loops {
		if !l.Backs(img) {
			continue
		}
		mps, err := xfsutil.LoopMountpoints(l.Device)
		if err != nil {
			return err
		}
		if len(mps) > 0 {
			return fmt.Errorf("%w: %s is attached to %s, which is mounted at %s; unmount it first", driver.ErrBusy, img, l.Device, strings.Join(mps, ", "))
		}
		if ok, err := xfsutil.DetachLoop(l.Device, img); err != nil {
			return mapErr(err)
		} else if ok {
			s.log.WithFields(logrus.Fields{"device": l.Device, "image": img}).Info("detached a loop device left attached to the image")
		}
	}
	var dev string
	err = retry.LoopDetach.Poll(context.Background(), func() (bool, error) { dev = loopDevice(img); return dev == "", nil })
	if errors.Is(err, retry.ErrGaveUp) {
		// Something outside this mount namespace still has it open: typically a namespace (a
		// container, a service with a private /tmp) created while the volume was mounted,
		// which keeps its own copy of the mount. DetachLoop left it set to detach at that last
		// close; the image's space is freed then.
		s.log.WithFields(logrus.Fields{"device": dev, "image": img}).Warn("a loop device stays attached to the image: another mount namespace still holds a copy of its mount; it detaches when that namespace ends")
	}
	return nil
}

// loopDevice returns the loop device img is attached to, or "".
func loopDevice(img string) string {
	loops, _ := xfsutil.Loops()
	for _, l := range loops {
		if l.Backs(img) {
			return l.Device
		}
	}
	return ""
}

// cleanTemps deletes the temporary images of Creates, Promotes and Imports that never finished.
// A generation whose completion marker (state=ready) was set before the crash is renamed into
// place instead, as the ZFS backend rolls such a generation forward.
func (s *Store) cleanTemps() error {
	if err := s.cleanTempsIn(s.volumesDir(), false); err != nil {
		return err
	}
	projects, err := os.ReadDir(s.goldensDir())
	if err != nil {
		return err
	}
	for _, p := range projects {
		if !p.IsDir() || driver.ValidateProject(p.Name()) != nil {
			continue
		}
		if err := s.cleanTempsIn(filepath.Join(s.goldensDir(), p.Name()), true); err != nil {
			return err
		}
	}
	return nil
}

func (s *Store) cleanTempsIn(dir string, generations bool) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if !isTemp(e.Name()) || !e.Type().IsRegular() {
			continue
		}
		path := filepath.Join(dir, e.Name())
		log := s.log.WithField("image", path)
		if n, ok := tempGeneration(e.Name()); ok && generations {
			m, err := readMeta(path)
			if err != nil {
				return err
			}
			final := genImage(dir, n)
			if m[attrState] == stateReady && !exists(final) {
				log.WithField("generation", n).Warn("finishing an interrupted promotion or import (it completed; renaming it into place)")
				if err := os.Rename(path, final); err != nil {
					return err
				}
				if err := xfsutil.SyncDir(dir); err != nil {
					return err
				}
				continue
			}
		}
		if isRemoved(e.Name()) {
			log.Info("deleting the image of a removed volume (its unlink was interrupted)")
		} else {
			log.Warn("deleting an image whose create, promotion or import was interrupted")
		}
		if err := s.removeFile(path); err != nil {
			return err
		}
	}
	return xfsutil.SyncDir(dir)
}

func roundUp(n, to uint64) uint64 { return (n + to - 1) / to * to }

// Create implements driver.Backend.
func (s *Store) Create(ctx context.Context, spec driver.Spec) (driver.Volume, error) {
	img, err := s.volumeImage(spec.Name)
	if err != nil {
		return driver.Volume{}, err
	}
	// type=fs volumes (git workspaces) are XFS images here too: reflinking one image is O(1),
	// while a reflink copy of a directory tree costs a metadata operation per file, which is
	// exactly the copy zgolden exists to avoid. The kind is recorded, so goldens keep their type.
	if exists(img) {
		return driver.Volume{}, fmt.Errorf("%w: volume %q already has an image, %s", driver.ErrExists, spec.Name, img)
	}
	m := meta{attrKind: string(spec.Kind), attrCreated: strconv.FormatInt(time.Now().Unix(), 10), attrState: stateReady}
	if spec.Golden != "" {
		if err := driver.ValidateProject(spec.Golden); err != nil {
			return driver.Volume{}, err
		}
		// Held until the clone is committed: see Store.gens.
		s.gens.RLock()
		defer s.gens.RUnlock()
		gen, err := s.pickGeneration(spec)
		if err != nil {
			return driver.Volume{}, err
		}
		if gen != nil {
			m[attrGolden], m[attrGeneration] = spec.Golden, strconv.Itoa(gen.Number)
			log := s.log.WithFields(logrus.Fields{"volume": spec.Name, "image": img, "project": spec.Golden, "generation": gen.Number})
			if claimed, err := s.claimSpare(spec, gen, img, log); err != nil {
				return driver.Volume{}, err
			} else if !claimed {
				if err := s.createClone(spec, img, gen, m); err != nil {
					return driver.Volume{}, err
				}
			}
			v, _, err := s.readVolume(spec.Name)
			return v, err
		}
		m[attrGolden], m[attrColdStart] = spec.Golden, yes
	}
	size := spec.Size
	if size == 0 {
		size = s.cfg.DefaultSize
	}
	if err := s.createEmpty(ctx, img, spec.Name, size, m); err != nil {
		return driver.Volume{}, err
	}
	v, _, err := s.readVolume(spec.Name)
	return v, err
}

// createClone reflinks generation gen into the volume image img.
func (s *Store) createClone(spec driver.Spec, img string, gen *driver.Generation, m meta) error {
	log := s.log.WithFields(logrus.Fields{"volume": spec.Name, "image": img, "project": spec.Golden, "generation": gen.Number})
	src, err := os.Open(gen.Source)
	if err != nil {
		return fmt.Errorf("open generation %d of golden %q: %w", gen.Number, spec.Golden, mapErr(err))
	}
	defer src.Close()
	fi, err := src.Stat()
	if err != nil {
		return err
	}
	gm, err := readMeta(gen.Source)
	if err != nil {
		return err
	}
	cur := uint64(fi.Size())
	var grow uint64
	if spec.Size > 0 {
		if spec.Size < cur {
			return fmt.Errorf("%w: size %d is smaller than generation %d of golden %q (%d bytes); a clone can only grow: omit -o size, or ask for at least that", driver.ErrInvalid, spec.Size, gen.Number, spec.Golden, cur)
		}
		if want := roundUp(spec.Size, 1<<20); want > cur {
			grow = want
		}
	}
	tmp, err := newTemp(s.volumesDir(), spec.Name)
	if err != nil {
		return mapErr(err)
	}
	fail := func(err error) error {
		s.discard(log, tmp)
		return err
	}
	if err := xfsutil.Clone(tmp, src); err != nil {
		return fail(mapErr(err))
	}
	s.cfg.Faults.Hit("create:after-clone") // a temporary image, not yet a volume
	if grow > 0 {
		// Only the image grows here (sparse, instant); the XFS inside grows at the first mount,
		// which is the first time it is mounted anyway.
		if err := tmp.Truncate(int64(grow)); err != nil {
			return fail(mapErr(err))
		}
		m[attrGrow] = yes
	}
	if gm[attrGrow] == yes { // the generation's own XFS was never grown to its image
		m[attrGrow] = yes
	}
	if err := setAttrs(tmp, m); err != nil {
		return fail(mapErr(err))
	}
	if err := commit(tmp, img); err != nil {
		return fail(mapErr(err))
	}
	tmp.Close()
	log.Debug("volume cloned")
	return nil
}

// Fork implements driver.Backend: src's image is reflinked into a temporary image (frozen for the
// instant of the reflink when mounted, as for a promotion), given src's attributes and renamed
// into place. Reflinked extents are shared copy-on-write, so either image can go first.
func (s *Store) Fork(ctx context.Context, src driver.Volume, mountpoint string, spec driver.Spec) (driver.Volume, error) {
	img, err := s.volumeImage(spec.Name)
	if err != nil {
		return driver.Volume{}, err
	}
	if exists(img) {
		return driver.Volume{}, fmt.Errorf("%w: volume %q already has an image, %s", driver.ErrExists, spec.Name, img)
	}
	srcImg, err := s.volumeImage(src.Name)
	if err != nil {
		return driver.Volume{}, err
	}
	in, err := os.Open(srcImg)
	if err != nil {
		return driver.Volume{}, fmt.Errorf("image of volume %q: %w", src.Name, mapErr(err))
	}
	defer in.Close()
	sm, err := readMeta(srcImg)
	if err != nil {
		return driver.Volume{}, err
	}
	log := s.log.WithFields(logrus.Fields{"volume": spec.Name, "image": img, "fork_of": src.Name})
	tmp, err := newTemp(s.volumesDir(), spec.Name)
	if err != nil {
		return driver.Volume{}, mapErr(err)
	}
	if err := s.cloneConsistent(ctx, tmp, in, srcImg, mountpoint); err != nil {
		s.discard(log, tmp)
		return driver.Volume{}, err
	}
	s.cfg.Faults.Hit("create:after-clone") // a temporary image, not yet a volume
	m := meta{attrKind: sm[attrKind], attrCreated: strconv.FormatInt(time.Now().Unix(), 10), attrState: stateReady, attrForkOf: src.Name}
	for _, k := range []string{attrGolden, attrGeneration, attrColdStart, attrGrow} {
		if sm[k] != "" { // the fork is what its source is: same golden, and an XFS still to grow
			m[k] = sm[k]
		}
	}
	if err := setAttrs(tmp, m); err != nil {
		s.discard(log, tmp)
		return driver.Volume{}, mapErr(err)
	}
	if err := commit(tmp, img); err != nil {
		s.discard(log, tmp)
		return driver.Volume{}, mapErr(err)
	}
	tmp.Close()
	log.WithField("frozen", mountpoint != "").Debug("volume forked")
	v, _, err := s.readVolume(spec.Name)
	return v, err
}

// createEmpty makes a fresh sparse image of size bytes with a new XFS.
func (s *Store) createEmpty(ctx context.Context, img, name string, size uint64, m meta) error {
	log := s.log.WithFields(logrus.Fields{"volume": name, "image": img})
	tmp, err := newTemp(s.volumesDir(), name)
	if err != nil {
		return mapErr(err)
	}
	if err := s.format(ctx, tmp, roundUp(size, 1<<20)); err != nil {
		s.discard(log, tmp)
		return err
	}
	s.cfg.Faults.Hit("create:after-format")
	if err := setAttrs(tmp, m); err != nil {
		s.discard(log, tmp)
		return mapErr(err)
	}
	if err := commit(tmp, img); err != nil {
		s.discard(log, tmp)
		return mapErr(err)
	}
	return tmp.Close()
}

// format sizes an empty temporary image (sparse: nothing is allocated) and makes an XFS in it.
func (s *Store) format(ctx context.Context, f *os.File, size uint64) error {
	if err := f.Truncate(int64(size)); err != nil {
		return mapErr(err)
	}
	if err := xfsutil.Mkfs(ctx, f.Name(), "zgolden"); err != nil {
		return mapErr(err)
	}
	return nil
}

// discard deletes a temporary image a failed operation made, logging (not returning) a failure
// to do so: the operation's own error is what the caller must see, and Load deletes it later.
func (s *Store) discard(log *logrus.Entry, f *os.File) {
	f.Close()
	if err := s.removeFile(f.Name()); err != nil {
		log.WithError(err).WithField("temp", f.Name()).Error("rollback: could not delete the partial image; it is deleted at the next start")
		return
	}
	log.WithField("temp", f.Name()).Info("rolled back the partial image")
}

// Remove implements driver.Backend: it renames the image away and unlinks it after returning,
// so its time does not grow with what the volume wrote.
func (s *Store) Remove(ctx context.Context, v driver.Volume) error {
	img, err := s.volumeImage(v.Name)
	if err != nil {
		return err
	}
	kept, l, err := s.keptOf(img)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return mapErr(err)
	}
	if kept != "" {
		if err := checkOnlyKept(img, kept, l); err != nil {
			return err
		}
	} else if err := s.releaseLoops(img); err != nil {
		return err
	}
	// Unlinking frees every extent the volume wrote, so it takes longer the more it wrote (make
	// bench: 2 ms for an untouched image, 12 ms after 1 GB). A rename to a temporary name takes
	// the same time whatever the image holds and frees the name at once; the unlink runs after
	// Remove returns, and one that a crash interrupts is finished by the next Load, which
	// deletes temporary images.
	gone, err := removedName(s.volumesDir(), v.Name)
	if err != nil {
		return err
	}
	if err := s.checkInside(img); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return mapErr(err)
	}
	id, err := fileID(img)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return mapErr(err)
	}
	t0 := time.Now()
	if err := os.Rename(img, gone); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return mapErr(err)
	}
	// The removal is durable once recorded (records.go); the directory's sync follows after the
	// unlink, in the background.
	t1 := time.Now()
	key := removalKey + id
	if err := s.putRecord(key, removalRecord{Name: v.Name}); err != nil {
		s.log.WithError(err).WithField("volume", v.Name).Warn("could not record the removal; syncing the volumes directory instead")
		key = ""
		if err := xfsutil.SyncDir(s.volumesDir()); err != nil {
			return err
		}
	}
	s.cfg.Faults.Hit("remove:after-record")
	s.log.WithFields(logrus.Fields{"volume": v.Name, "image": gone, "rename_took": t1.Sub(t0).Round(time.Microsecond).String(),
		"record_took": time.Since(t1).Round(time.Microsecond).String()}).Debug("removal recorded; the image is deleted in the background")
	s.unlinkCount.Add(1)
	s.unlinking.Add(1)
	go func() {
		defer s.unlinking.Done()
		defer s.unlinkCount.Add(-1)
		if kept != "" {
			// The kept mount's unmount flushes the volume's XFS into an image already unnamed;
			// it is what Unmount left out (kept.go). One that fails leaves the XFS mounted on
			// the unlinked image, which the next start unmounts (cleanKept): the image's space
			// comes back then.
			uctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			err := s.dropKept(uctx, kept)
			cancel()
			if err != nil {
				s.log.WithError(err).WithFields(logrus.Fields{"volume": v.Name, "image": gone}).Error("could not unmount a removed volume's kept mount; the next start unmounts it")
			}
			s.cfg.Faults.Hit("trash:after-unmount")
		}
		if err := s.removeFile(gone); err != nil {
			// The record stays, and the next start deletes the image.
			s.log.WithError(err).WithFields(logrus.Fields{"volume": v.Name, "image": gone}).Error("could not delete a removed volume's image; the next start deletes it")
			return
		}
		if key != "" {
			<-s.settle(key, "trash:after-destroy") // pending, in status, until its record is gone
		}
	}()
	return nil
}

// Mount implements driver.Backend. A volume that was mounted before has its XFS at its kept mount
// (kept.go), and Mount binds that. Otherwise xfsutil.Mount attaches the loop device with autoclear set, so
// the kernel detaches it when the filesystem is unmounted: no loop device outlives its mount.
func (s *Store) Mount(ctx context.Context, v driver.Volume, target string) error {
	img, err := s.volumeImage(v.Name)
	if err != nil {
		return err
	}
	if _, err := os.Stat(img); err != nil {
		return fmt.Errorf("image of volume %q: %w", v.Name, mapErr(err))
	}
	log := s.log.WithFields(logrus.Fields{"volume": v.Name, "image": img, "mountpoint": target})
	if bound, err := s.bindKept(img, target, log); bound || err != nil {
		return mapErr(err)
	}
	// A loop device left attached to the image would be a second writer of its XFS (xfsutil.Mount
	// does not refuse one as mount(8) did, "overlapping"); one that is mounted makes this busy.
	if err := s.releaseLoops(img); err != nil {
		return err
	}
	opts := append([]string{"loop"}, xfsutil.MountOptions(s.cfg.Discard)...)
	if err := xfsutil.Mount(ctx, img, target, opts); err != nil {
		if rerr := s.releaseLoops(img); rerr != nil {
			log.WithError(rerr).Error("could not detach the loop device after a failed mount")
		}
		return mapErr(err)
	}
	m, err := readMeta(img)
	if err == nil && m[attrGrow] == yes {
		if err = xfsutil.Grow(ctx, target); err == nil {
			err = removeAttr(img, attrGrow)
		}
	}
	if err != nil {
		uctx, cancel := bounded(ctx, time.Minute)
		defer cancel()
		if uerr := xfsutil.UnmountRetry(uctx, target, 5); uerr != nil {
			log.WithError(uerr).Error("could not unmount after a failed grow")
		} else if rerr := s.releaseLoops(img); rerr != nil {
			log.WithError(rerr).Error("could not detach the loop device after a failed grow")
		}
		return mapErr(err)
	}
	return nil
}

// Unmount implements driver.Backend. The volume's XFS stays mounted at its kept mount until
// Remove (kept.go); where that cannot be done, it is unmounted. It never detaches lazily: a busy
// filesystem is reported as ErrBusy and stays mounted.
func (s *Store) Unmount(ctx context.Context, v driver.Volume, target string) error {
	img, err := s.volumeImage(v.Name)
	if err != nil {
		return err
	}
	if s.keepMounted(img, target, s.log.WithFields(logrus.Fields{"volume": v.Name, "image": img, "mountpoint": target})) {
		return nil
	}
	if err := xfsutil.UnmountRetry(ctx, target, 10); err != nil {
		return mapErr(err)
	}
	// Autoclear has already detached the loop device; this catches one attached some other way.
	return s.releaseLoops(img)
}

// Mounted implements driver.Backend.
func (s *Store) Mounted(target string) (bool, error) {
	return xfsutil.IsMountpoint(target)
}

// Usage implements driver.Backend. Written is what FIEMAP reports as not shared: the blocks the
// volume has written since its clone (plus, once a generation is deleted, the blocks only this
// volume still holds of it). It reads the image as of its last writeback, usually within 30 s of
// a write: XFS only remaps copied-on-write blocks then, and forcing a writeback here would make
// every Docker Get (container starts call it) wait for the volume's dirty data.
func (s *Store) Usage(ctx context.Context, v driver.Volume) (driver.Usage, error) {
	img, err := s.volumeImage(v.Name)
	if err != nil {
		return driver.Usage{}, err
	}
	f, err := os.Open(img)
	if err != nil {
		return driver.Usage{}, mapErr(err)
	}
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return driver.Usage{}, err
	}
	ext, err := xfsutil.FileExtents(f)
	if err != nil {
		// Without FIEMAP, st_blocks is all there is: it counts shared blocks too, so Written
		// overstates what the volume added.
		s.log.WithError(err).WithField("volume", v.Name).Debug("FIEMAP failed; using st_blocks")
		ext = xfsutil.Extents{Allocated: uint64(st.Blocks) * 512}
	}
	return driver.Usage{
		Size: uint64(st.Size), Logical: ext.Allocated, Referenced: ext.Allocated,
		Written: ext.Exclusive(), Device: loopDevice(img),
	}, nil
}
