package zfsstore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/zgolden/zgolden/xfsutil"
	"github.com/zgolden/zgolden/zfsutil"
)

// Spares mounted ahead of their claim, and volumes kept mounted after Docker's Unmount.
//
// Mounting XFS reads its log and writes to it, through the zvol, and on a busy pool that I/O
// (docs/design-facts.md, "Mounting and unmounting XFS on a busy pool")
// queues behind the writers: the load case measured a claimed spare's Create at 74 ms and its
// Mount at about 380 ms more, against 160 ms for both idle (zfs 2.4, guest). So the worker also
// mounts each ready spare's XFS, with the options Mount uses, at WORKDIR/spares/ID, and a Mount
// of the volume that claimed it binds that mount to its target: one mount call, no I/O.
//
// The early mount then stays beside Docker's mountpoint until the volume is destroyed, so that
// Unmount only unmounts Docker's mountpoint, which is not the XFS's last mount and writes
// nothing. An earlier design detached the early mount at Mount and bound a new one at Unmount:
// two more mount calls on Docker's paths, and the detach waits for the kernel's RCU grace
// period, which under the load case's emulated CPUs took tens of milliseconds.
//
// The truth is the kernel's mount table: a mount under WORKDIR/spares whose device is a zvol
// (BLKZNAME) is that dataset's early mount, whatever the dataset is called now (the finisher
// renames a claimed spare with its XFS mounted). A dataset has at most one. Nothing else
// records it:
//   - destroy unmounts a dataset's early mount first, so no path that retires a spare or
//     destroys a removed volume is held busy by one;
//   - Promote and fork freeze a volume's early mount when Docker has not mounted it (the two
//     mounts are one XFS, so freezing either freezes both);
//   - Close unmounts the early mounts, so nothing stays mounted that Docker did not ask for;
//   - the worker mounts ready spares that have none (after a stop, a crash that left none, or a
//     reboot).
//
// A spare whose early mount fails is still a spare: its Mount mounts the device as usual.
//
// Unmount of a volume with no early mount (one mounted before a restart, whose early mount
// Close took, or one that was not a spare) has the same problem the other way round: unmounting
// XFS flushes what the container wrote and writes the log, and under load that I/O queued
// behind the writers (the load case: 0.34 s p99 under load against 57 ms idle on zfs 2.4; the
// raw umount of a written zvol took up to 145 s in the guest, where Docker gives Unmount one
// minute). So Unmount binds its XFS at WORKDIR/spares/u-NAME.STAMP first (keepMounted; the
// stamp keeps it apart from the kept mount of a removed volume of the same name, which waits in
// the trash). The kept mount is an early mount like a spare's, with the same rules above: the
// next Mount binds it, Promote and fork freeze it, the destroy of a removed volume unmounts it
// in the trash worker (where its flush and the zvol's last close wait for the pool off every
// caller's path), and Close unmounts it. What changes for the user: when Unmount returns, what the container wrote may
// still be in the page cache rather than on the pool, as it is while a volume is mounted; a host
// crash then loses what a crash of a mounted volume loses, and XFS's log keeps it consistent.

func (s *Store) premountDir() string { return filepath.Join(s.cfg.WorkDir, "spares") }

// premount mounts a ready spare's XFS at WORKDIR/spares/ID; a failure only costs the claim's
// Mount its head start.
func (s *Store) premount(ctx context.Context, ds, dev string) {
	target := filepath.Join(s.premountDir(), path.Base(ds))
	if err := xfsutil.Mount(ctx, dev, target, xfsutil.MountOptions(s.cfg.Discard)); err != nil {
		_ = os.Remove(target)
		s.log.WithError(err).WithField("dataset", ds).Warn("could not mount a spare ahead of its claim; its Mount mounts the device instead")
		return
	}
	s.setHint(ds, target)
}

// premounts returns the early mounts by the dataset their device is now. It opens every early
// mount's device to ask its name, so it also refreshes the hints premountOf starts from.
func (s *Store) premounts() (map[string]string, error) {
	mounts, err := xfsutil.MountsUnder(s.premountDir())
	if err != nil {
		return nil, err
	}
	return s.scanPremounts(mounts), nil
}

func (s *Store) scanPremounts(mounts []xfsutil.MountEntry) map[string]string {
	s.pmHints.Lock()
	renames := s.pmHints.renames
	s.pmHints.Unlock()
	out, hints := map[string]string{}, map[string]earlyMount{}
	for _, m := range mounts {
		if m.Mountpoint == s.premountDir() {
			continue
		}
		if ds := zfsutil.ZvolName(m.Source); ds != "" && inside(s.cfg.Parent, ds) {
			out[ds] = m.Mountpoint
			hints[ds] = earlyMount{path: m.Mountpoint, dev: m.Dev}
		}
	}
	s.pmHints.Lock()
	if s.pmHints.renames == renames {
		// A rename during the scan may have given a device its new name after the scan asked
		// it: its hints would put the old name back on that device.
		s.pmHints.m = hints
	}
	s.pmHints.Unlock()
	return out
}

// earlyMount is a hint of where a dataset's early mount is: its path, and the device number of
// the zvol mounted there when it was seen.
type earlyMount struct {
	path string
	dev  uint64
}

// premountOf returns ds's early mount, or "". Each volume keeps one until it is destroyed, so
// there are about as many as volumes, and a scan opens each one's device to ask its name (and
// an open can wait on ZFS while a zvol is being renamed, as a claimed spare is right after its
// Create). So premountOf first checks where the last scan, the worker's premount or the
// renames (renameHint) saw ds, with one stat: the path must still be on the device it was on
// then. A zvol keeps its device number across a rename, and every rename of a dataset that can
// have an early mount moves its hint (the finisher's of a claimed spare, Remove's and
// clearRemoval's into the trash), so a match is ds's early mount: a hint left on a removed
// volume's name would bind its XFS into the next volume of that name. Only a miss reads the
// mount table and scans. The hint is never the truth, only where to look first.
func (s *Store) premountOf(ds string) string {
	if pm := s.hinted(ds); pm != "" {
		return pm
	}
	mounts, err := xfsutil.MountsUnder(s.premountDir())
	if err != nil {
		s.log.WithError(err).WithField("dataset", ds).Warn("cannot read the mount table for early mounts")
		return ""
	}
	return s.scanPremounts(mounts)[ds]
}

// hinted returns ds's early mount where its hint still holds, or "" (not known without a scan).
func (s *Store) hinted(ds string) string {
	s.pmHints.Lock()
	hint := s.pmHints.m[ds]
	s.pmHints.Unlock()
	if hint.path == "" {
		return ""
	}
	var st unix.Stat_t
	if unix.Stat(hint.path, &st) != nil || st.Dev != hint.dev {
		return ""
	}
	return hint.path
}

// setHint records where an early mount of ds was just made.
func (s *Store) setHint(ds, pm string) {
	var st unix.Stat_t
	if unix.Stat(pm, &st) != nil {
		return // the next scan finds it
	}
	s.pmHints.Lock()
	defer s.pmHints.Unlock()
	if s.pmHints.m == nil {
		s.pmHints.m = map[string]earlyMount{}
	}
	s.pmHints.m[ds] = earlyMount{path: pm, dev: st.Dev}
}

// renameHint moves the hint of an early mount from a dataset's old name to its new one, once a
// rename has returned: the finisher's of a claimed spare (so the volume's next Mount or Unmount
// finds it without a scan), and Remove's or clearRemoval's into the trash (so the old name,
// which a new volume may take, points nowhere).
func (s *Store) renameHint(from, to string) {
	s.pmHints.Lock()
	defer s.pmHints.Unlock()
	s.pmHints.renames++
	if h, ok := s.pmHints.m[from]; ok {
		delete(s.pmHints.m, from)
		s.pmHints.m[to] = h
	}
}

// bindEarly binds the early mount at pm to target, which is then the volume's second mount of
// one XFS; false when that failed, and Mount mounts the device instead (the kernel gives it the
// same XFS).
func (s *Store) bindEarly(pm, target string, log *logrus.Entry) bool {
	err := os.MkdirAll(target, 0o755)
	if err == nil {
		err = unix.Mount(pm, target, "", unix.MS_BIND, "")
	}
	if err != nil {
		log.WithError(err).Warn("could not bind the volume's early mount; mounting its device instead")
		return false
	}
	s.cfg.Faults.Hit("mount:after-bind")
	return true
}

// keepMounted unmounts Docker's mountpoint target of a block volume while an early mount holds
// its XFS, so the unmount writes nothing: the early mount is the one Mount bound from, or else a
// new bind at WORKDIR/spares/u-NAME.STAMP. It is false, with target as it was, when either step
// fails: a busy target (a process still in it) is then reported by the usual unmount.
func (s *Store) keepMounted(ds, target string, log *logrus.Entry) bool {
	pm, made := s.premountOf(ds), false
	if pm == "" {
		stamp := strconv.FormatInt(time.Now().UnixNano(), 36)
		pm, made = filepath.Join(s.premountDir(), keptPrefix+path.Base(ds)+"."+stamp), true
		if err := os.MkdirAll(pm, 0o755); err != nil {
			log.WithError(err).Warn("could not keep the volume's XFS mounted; unmounting it the usual way")
			return false
		}
		if err := unix.Mount(target, pm, "", unix.MS_BIND, ""); err != nil {
			_ = os.Remove(pm)
			log.WithError(err).Warn("could not keep the volume's XFS mounted; unmounting it the usual way")
			return false
		}
		s.cfg.Faults.Hit("unmount:after-bind")
		s.setHint(ds, pm)
	}
	if err := unix.Unmount(target, 0); err != nil {
		if made {
			s.dropPremount(pm, log)
		}
		log.WithError(err).Debug("Docker's mountpoint did not unmount; unmounting it the usual way")
		return false
	}
	return true
}

// keptPrefix names the early mount of a volume that Docker unmounted, beside the spares' own.
const keptPrefix = "u-"

// dropPremount detaches an early mount and removes its directory. Detached, the XFS lives on
// as long as another mount of it does, and is unmounted when the last one goes.
func (s *Store) dropPremount(pm string, log *logrus.Entry) {
	if err := unix.Unmount(pm, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		log.WithError(err).WithField("mountpoint", pm).Warn("could not detach a spare's early mount")
		return
	}
	_ = os.Remove(pm)
}

// unmountPremount unmounts ds's early mount before ds is destroyed, waiting for it: a detached
// mount would keep the device busy until the kernel let go of it.
func (s *Store) unmountPremount(ctx context.Context, ds string) error {
	pm := s.premountOf(ds)
	if pm == "" {
		return nil
	}
	if err := xfsutil.UnmountRetry(ctx, pm, 5); err != nil {
		return fmt.Errorf("unmount the early mount %s of %s: %w", pm, ds, err)
	}
	_ = os.Remove(pm)
	return nil
}

// loadPremounts removes the directories under WORKDIR/spares left without a mount (after a
// reboot).
func (s *Store) loadPremounts() error {
	pm, err := s.premounts()
	if err != nil {
		return err
	}
	early := map[string]bool{}
	for _, p := range pm {
		early[p] = true
	}
	entries, err := os.ReadDir(s.premountDir())
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	for _, e := range entries {
		if p := filepath.Join(s.premountDir(), e.Name()); !early[p] {
			_ = os.Remove(p) // an empty directory; a mount of something else stays (Remove fails)
		}
	}
	return nil
}
