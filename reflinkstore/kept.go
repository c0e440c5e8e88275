package reflinkstore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/xfsutil"
)

// Kept mounts: a volume's XFS stays mounted from its first Mount until its Remove.
//
// Unmounting an image's XFS flushes what the container wrote and writes the XFS log, through the
// loop device into the image, behind every other writer on the host's disk: the load case
// measured a reflink Unmount at 5 ms idle and 23-36 ms under load, all of it that I/O. So
// Unmount binds the XFS at WORKDIR/kept-INO first and then unmounts Docker's mountpoint, which,
// not being the XFS's last mount, writes nothing; a later Mount binds the kept mount back, and the
// real unmount happens after Remove has returned, before the image's unlink.
//
// INO is the image's inode number. The kernel gives it to no other file while this one exists,
// and a kept mount keeps the file in existence (its loop device holds it open, even once it is
// unlinked), so a kept mount can name only its own image: after a Remove a new volume of the same
// name is a new file with a new number and never finds the removed one's XFS. Every lookup also
// checks that the loop device under the kept mount backs the image (keptOf). The mount table is
// the only record: a stop unmounts them (Stop), a start after a kill -9 keeps those of listed
// volumes and unmounts the rest (a crash after a Remove's rename), and after a reboot there are
// none.
//
// The cost is durability at Unmount: what the container wrote may still be in the page cache when
// Unmount returns, as it is while the volume is mounted; XFS's log keeps the volume consistent
// through a host crash either way. A fork or promotion of a volume that only a kept mount holds
// freezes that mount, as it would Docker's (cloneConsistent).

// keptPrefix names a kept mount's directory in the work directory, beside the imports' own. Each
// goes with its mount, so nothing is left behind once every volume is removed.
const keptPrefix = "kept-"

// keptPath is where the XFS of the image with inode ino is kept mounted.
func (s *Store) keptPath(ino uint64) string {
	return filepath.Join(s.cfg.WorkDir, keptPrefix+strconv.FormatUint(ino, 10))
}

// keptOf returns the kept mount of img and the loop device under it, or "" when img has none.
func (s *Store) keptOf(img string) (string, xfsutil.Loop, error) {
	var st unix.Stat_t
	if err := unix.Stat(img, &st); err != nil {
		return "", xfsutil.Loop{}, err
	}
	p := s.keptPath(st.Ino)
	l, err := xfsutil.LoopAt(p)
	if errors.Is(err, os.ErrNotExist) {
		return "", xfsutil.Loop{}, nil
	}
	if err != nil {
		return "", xfsutil.Loop{}, err
	}
	if l.BackingFile == "" || !l.Backs(img) {
		return "", xfsutil.Loop{}, nil // a directory left without its mount, or on another device
	}
	return p, l, nil
}

// bindKept binds img's kept mount, if it has one, at target; false when it has none.
func (s *Store) bindKept(img, target string, log *logrus.Entry) (bool, error) {
	kept, _, err := s.keptOf(img)
	if err != nil || kept == "" {
		return false, err
	}
	if err := os.MkdirAll(target, 0o755); err != nil {
		return false, err
	}
	if err := unix.Mount(kept, target, "", unix.MS_BIND, ""); err != nil {
		// Never a second loop device on the image instead: that would be a second writer of one
		// XFS. The kept mount stays for the next try.
		return false, fmt.Errorf("bind the volume's kept mount %s at %s: %w", kept, target, err)
	}
	s.cfg.Faults.Hit("mount:after-bind")
	log.WithField("kept", kept).Debug("bound the kept mount")
	return true, nil
}

// keepMounted unmounts Docker's mountpoint target of img while a kept mount holds its XFS, so the
// unmount writes nothing. It is false, with target as it was, when target is not a mount of img
// or a step fails (a process still in target): the usual unmount then reports what is wrong.
func (s *Store) keepMounted(img, target string, log *logrus.Entry) bool {
	l, err := xfsutil.LoopAt(target)
	if err != nil || l.BackingFile == "" || !l.Backs(img) {
		return false
	}
	var st unix.Stat_t
	if err := unix.Stat(img, &st); err != nil {
		return false
	}
	kept, made := s.keptPath(st.Ino), false
	if kl, err := xfsutil.LoopAt(kept); err != nil || kl.Device != l.Device {
		if err := os.MkdirAll(kept, 0o755); err != nil {
			log.WithError(err).Warn("could not keep the volume's XFS mounted; unmounting it the usual way")
			return false
		}
		if err := unix.Mount(target, kept, "", unix.MS_BIND, ""); err != nil {
			_ = os.Remove(kept)
			log.WithError(err).Warn("could not keep the volume's XFS mounted; unmounting it the usual way")
			return false
		}
		made = true
		s.cfg.Faults.Hit("unmount:after-bind")
	}
	if err := unix.Unmount(target, 0); err != nil {
		if made {
			// Detached, not unmounted: target still holds the XFS, so this writes nothing.
			if derr := unix.Unmount(kept, unix.MNT_DETACH); derr == nil {
				_ = os.Remove(kept)
			}
		}
		log.WithError(err).Debug("Docker's mountpoint did not unmount; unmounting it the usual way")
		return false
	}
	log.WithFields(logrus.Fields{"kept": kept, "bound": made}).Debug("unmounted Docker's mountpoint; the XFS stays mounted until Remove")
	return true
}

// checkOnlyKept refuses a Remove while img's XFS is mounted anywhere but at its kept mount.
func checkOnlyKept(img, kept string, l xfsutil.Loop) error {
	mps, err := xfsutil.LoopMountpoints(l.Device)
	if err != nil {
		return err
	}
	var others []string
	for _, mp := range mps {
		if mp != kept {
			others = append(others, mp)
		}
	}
	if len(others) > 0 {
		return fmt.Errorf("%w: %s is attached to %s, which is mounted at %s; unmount it first", driver.ErrBusy, img, l.Device, strings.Join(others, ", "))
	}
	return nil
}

// dropKept unmounts a kept mount for good, waiting until its loop device has let go of the image
// (xfsutil.Unmount), and removes its directory. While another mount holds the same XFS (Docker's,
// at a stop), the kept one is only detached: the XFS lives on in the other.
func (s *Store) dropKept(ctx context.Context, kept string) error {
	if l, err := xfsutil.LoopAt(kept); err == nil && l.Device != "" {
		if mps, err := xfsutil.LoopMountpoints(l.Device); err == nil && len(mps) > 1 {
			if err := unix.Unmount(kept, unix.MNT_DETACH); err != nil {
				return fmt.Errorf("detach the kept mount %s: %w", kept, err)
			}
			_ = os.Remove(kept)
			return nil
		}
	}
	if err := xfsutil.UnmountRetry(ctx, kept, 10); err != nil {
		return fmt.Errorf("unmount the kept mount %s: %w", kept, mapErr(err))
	}
	_ = os.Remove(kept)
	return nil
}

// keptMounts lists the kept mounts, by path, with the inode each names.
func (s *Store) keptMounts() (map[string]uint64, error) {
	mounts, err := xfsutil.MountsUnder(s.cfg.WorkDir)
	if err != nil {
		return nil, err
	}
	out := map[string]uint64{}
	for _, m := range mounts {
		n, ok := strings.CutPrefix(filepath.Base(m.Mountpoint), keptPrefix)
		if filepath.Dir(m.Mountpoint) != s.cfg.WorkDir || !ok {
			continue // an import's, or not one of ours (a mount under a volume's own XFS, say)
		}
		if ino, err := strconv.ParseUint(n, 10, 64); err == nil {
			out[m.Mountpoint] = ino
		}
	}
	return out, nil
}

// cleanKept, at a start, unmounts the kept mounts that no volume's image owns any more (a crash
// after a Remove's rename and before its unmount), and removes the directories a reboot left
// without their mount. The kept mounts of listed volumes stay.
func (s *Store) cleanKept(ctx context.Context) error {
	kept, err := s.keptMounts()
	if err != nil {
		return err
	}
	if len(kept) > 0 {
		live := map[uint64]string{}                                   // the volumes' images, by inode; a removed one is a temporary
		for _, dir := range []string{s.volumesDir(), s.sparesDir()} { // spares.go: a spare's XFS is kept mounted too
			entries, err := os.ReadDir(dir)
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			if err != nil {
				return err
			}
			for _, e := range entries {
				var st unix.Stat_t
				if p := filepath.Join(dir, e.Name()); strings.HasSuffix(e.Name(), imgExt) && !strings.HasPrefix(e.Name(), tmpPrefix) && unix.Stat(p, &st) == nil {
					live[st.Ino] = p
				}
			}
		}
		for mp, ino := range kept {
			if img := live[ino]; img != "" {
				if l, err := xfsutil.LoopAt(mp); err == nil && l.Backs(img) {
					continue
				}
			}
			s.log.WithField("kept", mp).Warn("unmounting the kept mount of a removed volume that a restart interrupted")
			if err := s.dropKept(ctx, mp); err != nil {
				return err
			}
		}
	}
	entries, err := os.ReadDir(s.cfg.WorkDir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if p := filepath.Join(s.cfg.WorkDir, e.Name()); strings.HasPrefix(e.Name(), keptPrefix) && kept[p] == 0 {
			_ = os.Remove(p) // rmdir: an empty directory only
		}
	}
	return nil
}

// closeKept unmounts every kept mount: nothing stays mounted that Docker did not ask for, and a
// volume Docker still has mounted keeps its XFS through Docker's mount.
func (s *Store) closeKept(ctx context.Context) error {
	kept, err := s.keptMounts()
	if err != nil {
		return err
	}
	var errs []error
	for mp := range kept {
		errs = append(errs, s.dropKept(ctx, mp))
	}
	return errors.Join(errs...)
}
