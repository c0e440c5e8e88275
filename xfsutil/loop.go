package xfsutil

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/zgolden/zgolden/internal/retry"
)

// Loop is one attached loop device and the file behind it, as the kernel reports it in
// /sys/block/loopN/loop/backing_file.
type Loop struct {
	Device      string // /dev/loopN
	BackingFile string // the file's current path (the kernel follows renames)
	Deleted     bool   // the file was unlinked while still attached
}

const deletedSuffix = " (deleted)"

// Loops lists every attached loop device. Devices that detach while it reads are skipped.
func Loops() ([]Loop, error) {
	paths, err := filepath.Glob("/sys/block/loop*/loop/backing_file")
	if err != nil {
		return nil, err
	}
	out := make([]Loop, 0, len(paths))
	for _, p := range paths {
		l, err := LoopOf("/dev/" + filepath.Base(filepath.Dir(filepath.Dir(p))))
		if err != nil {
			return nil, err
		}
		if l.BackingFile != "" { // detached meanwhile
			out = append(out, l)
		}
	}
	return out, nil
}

// detached recognises what reading a loop device's sysfs attributes returns while the kernel
// tears it down, which it does asynchronously after the last close: ENOENT, ENXIO or ENODEV.
func detached(err error) bool {
	return errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ENXIO) || errors.Is(err, unix.ENODEV)
}

// LoopMountpoints returns where dev is mounted in this mount namespace.
func LoopMountpoints(dev string) ([]string, error) {
	mounts, err := mountinfo.GetMounts(func(i *mountinfo.Info) (skip, stop bool) {
		return i.Source != dev, false
	})
	if err != nil {
		return nil, err
	}
	out := make([]string, 0, len(mounts))
	for _, m := range mounts {
		out = append(out, m.Mountpoint)
	}
	return out, nil
}

// Backs reports whether l is attached to the file at path.
//
// The kernel renders backing_file from the file's mount anew for each reader, so the path is
// only right while the mount namespace that attached the device lives: a device that an earlier
// instance of the managed plugin attached (its namespace gone with it, the device kept by the
// mount it backs) reads as a path relative to a detached mount, such as "/reflink/store.img".
// A path that differs but names the same file is therefore checked by identity, the inode and
// device that LOOP_GET_STATUS64 reports against stat(path). The name is only a cheap filter: the
// identity decides, and the inode of an attached file cannot be reused, even once unlinked.
func (l Loop) Backs(path string) bool {
	if l.BackingFile == path && !l.Deleted {
		return true
	}
	if filepath.Base(l.BackingFile) != filepath.Base(path) {
		return false
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return false
	}
	fd, err := unix.Open(l.Device, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	info, err := unix.IoctlLoopGetStatus64(fd)
	if err != nil {
		return false
	}
	return info.Inode == st.Ino && info.Device == st.Dev
}

// LoopOf describes dev; its BackingFile is "" when dev is not attached.
func LoopOf(dev string) (Loop, error) {
	l := Loop{Device: dev}
	data, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop", "backing_file"))
	if detached(err) {
		return l, nil
	}
	if err != nil {
		return l, err
	}
	l.BackingFile, l.Deleted = strings.CutSuffix(strings.TrimSuffix(string(data), "\n"), deletedSuffix)
	return l, nil
}

// DetachLoop detaches dev if, and only if, it is still backed by backing; it reports whether it
// did. The kernel finishes the detach asynchronously, after this returns. The device is opened first and its backing file checked afterwards: while the device is held
// open it cannot be detached and attached to another file (LOOP_SET_FD needs an unbound device and
// autoclear waits for the last close), so a device that losetup or autoclear reused in between is
// never detached by mistake. If something else still has the device open (a mount in another
// mount namespace, say), the kernel only marks it to detach on its last close instead of pulling it
// from under its user.
func DetachLoop(dev, backing string) (bool, error) {
	fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		if detached(err) {
			return false, nil
		}
		return false, fmt.Errorf("open %s to detach it: %w", dev, err)
	}
	defer unix.Close(fd)
	cur, err := LoopOf(dev)
	if err != nil {
		return false, err
	}
	if !cur.Backs(backing) {
		return false, nil
	}
	if err := unix.IoctlSetInt(fd, unix.LOOP_CLR_FD, 0); err != nil {
		if detached(err) {
			return false, nil // detached meanwhile
		}
		if errors.Is(err, unix.EBUSY) {
			return false, fmt.Errorf("%w: detach %s (%s): %v", ErrBusy, dev, backing, err)
		}
		return false, fmt.Errorf("detach %s (%s): %w", dev, backing, err)
	}
	return true, nil
}

// attachLoop attaches a free loop device to the image file at path, with autoclear set as
// mount(8) -o loop does, and returns the device and an open descriptor of it. The kernel detaches
// an autoclear device at its last close, so the caller closes fd once it has mounted the device
// (the mount then holds it until unmount) or, after a failed mount, to detach it.
//
// LOOP_CTL_GET_FREE only names a device that was free when asked: another process (losetup,
// Docker's own loop users) can take it first, and LOOP_CONFIGURE then fails with EBUSY, so the
// attach is retried on another device, as util-linux does.
func attachLoop(path string) (string, int, error) {
	file, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", -1, fmt.Errorf("open image %s for a loop device: %w", path, err)
	}
	defer unix.Close(file) // the attached device holds its own reference to the file
	ctl, err := unix.Open("/dev/loop-control", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", -1, fmt.Errorf("open /dev/loop-control to attach %s: %w (is the loop module loaded, and /dev the host's?)", path, err)
	}
	defer unix.Close(ctl)
	cfg := unix.LoopConfig{Fd: uint32(file)}
	cfg.Info.Flags = unix.LO_FLAGS_AUTOCLEAR
	copy(cfg.Info.File_name[:len(cfg.Info.File_name)-1], path) // informational only, as losetup shows it
	var last error
	for try := 0; try < 16; try++ {
		n, err := unix.IoctlRetInt(ctl, unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return "", -1, fmt.Errorf("find a free loop device for %s: %w", path, err)
		}
		dev := "/dev/loop" + strconv.Itoa(n)
		fd, err := openLoop(dev)
		if err != nil {
			return "", -1, err
		}
		err = unix.IoctlLoopConfigure(fd, &cfg)
		if errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EINVAL) {
			err = setFD(fd, file, &cfg.Info) // a kernel before 5.8 has no LOOP_CONFIGURE
		}
		if err == nil {
			return dev, fd, nil
		}
		unix.Close(fd)
		if !errors.Is(err, unix.EBUSY) {
			return "", -1, fmt.Errorf("attach %s to %s: %w", path, dev, err)
		}
		last = err
	}
	return "", -1, fmt.Errorf("attach %s to a loop device: every free device was taken first (%v); retry", path, last)
}

// openLoop opens a loop device that LOOP_CTL_GET_FREE may have just created: devtmpfs makes its
// node at once on a host, but a /dev that is not devtmpfs can lag.
func openLoop(dev string) (int, error) {
	fd := -1
	err := retry.LoopNode.Do(context.Background(), func(err error) bool { return errors.Is(err, unix.ENOENT) }, func() (err error) {
		fd, err = unix.Open(dev, unix.O_RDWR|unix.O_CLOEXEC, 0)
		return err
	})
	if err != nil {
		return -1, fmt.Errorf("open %s: %w", dev, err)
	}
	return fd, nil
}

// setFD is LOOP_CONFIGURE in the two steps older kernels have; a failed status leaves the device
// detached again.
func setFD(fd, file int, info *unix.LoopInfo64) error {
	if err := unix.IoctlSetInt(fd, unix.LOOP_SET_FD, file); err != nil {
		return err
	}
	if err := unix.IoctlLoopSetStatus64(fd, info); err != nil {
		_ = unix.IoctlSetInt(fd, unix.LOOP_CLR_FD, 0)
		return err
	}
	return nil
}

// loopRelease names the loop device a filesystem sits on and the file it backs, to wait for it
// to let go of that file once the filesystem is unmounted. The zero value is a filesystem on no
// loop device.
type loopRelease struct{ dev, backing string }

// loopUnder finds, from its device number, the loop device of the filesystem mounted at target;
// a target on any other device gives the zero value. The number comes from a stat, without the
// mount table, except where the stat fails: an XFS that has shut down answers it with EIO, and is
// still to be unmounted and its device waited for, so the mount table answers then.
func loopUnder(target string) loopRelease {
	var dev uint64
	var st unix.Stat_t
	if err := unix.Stat(target, &st); err == nil {
		dev = st.Dev
	} else if m, _ := MountedAt(target); m != nil {
		dev = m.Dev
	} else {
		return loopRelease{}
	}
	if name := loopName(dev); name != "" {
		return loopHeld(name)
	}
	return loopRelease{}
}

// loopName is the loop device with device number dev, or "" when dev is no loop device.
func loopName(dev uint64) string {
	link, err := os.Readlink(fmt.Sprintf("/sys/dev/block/%d:%d", unix.Major(dev), unix.Minor(dev)))
	if err != nil || !strings.HasPrefix(filepath.Base(link), "loop") {
		return ""
	}
	return "/dev/" + filepath.Base(link)
}

// LoopAt describes the loop device that the filesystem holding path sits on, from one stat and
// no mount table; a zero Loop when that filesystem is on no loop device.
func LoopAt(path string) (Loop, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return Loop{}, err
	}
	name := loopName(st.Dev)
	if name == "" {
		return Loop{}, nil
	}
	return LoopOf(name)
}

// loopHeld records what the loop device dev backs now.
func loopHeld(dev string) loopRelease {
	l, err := LoopOf(dev)
	if err != nil || l.BackingFile == "" {
		return loopRelease{}
	}
	return loopRelease{dev: dev, backing: l.BackingFile}
}

// wait returns once the device no longer backs the same file, or when retry.LoopRelease gives up.
//
// An autoclear device detaches at its last close, and that close is ours (umount(2), or closing
// the descriptor after a failed mount) unless someone else has the device open: in practice
// udev, whose blkid probe of a freshly attached device can still be running. The detach then
// happens in udev's close, just after ours, and until it does the image stays open, so the
// filesystem holding the image cannot be unmounted (EBUSY) and a copy of the image may race a
// device that still has it. Waiting makes "unmounted" mean "the image is free" for the caller.
// A device that outlives the wait is left to the kernel, which still detaches it at that last
// close. Another file attached to the same device since reads differently and ends the wait.
func (l loopRelease) wait() {
	if l.dev == "" {
		return
	}
	_ = retry.LoopRelease.Poll(context.Background(), func() (bool, error) {
		cur, err := LoopOf(l.dev)
		return err != nil || cur.BackingFile != l.backing, nil
	})
}
