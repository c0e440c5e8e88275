// Package xfsutil formats, mounts, freezes and unmounts the XFS filesystems inside zgolden volumes,
// and reads the mount table; with zfsutil it is the only place zgolden runs system commands.
package xfsutil

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/zgolden/zgolden/internal/command"
	"github.com/zgolden/zgolden/internal/retry"
)

// Sentinel errors callers act on.
var (
	ErrBusy    = errors.New("target is busy")
	ErrNoSpace = errors.New("no space left on device")
	// ErrContended is a zvol whose open gave up on a contended ZFS lock: since Linux 5.13,
	// zvol_open returns ERESTARTSYS to its caller when spa_namespace_lock stays taken (openzfs
	// #12301, only partly fixed by a bounded retry in #12759), and mount(8) or mkfs.xfs print it
	// as "Unknown error 512". It is transient: the same call succeeds once the lock is free.
	ErrContended = errors.New("zvol open contended (ERESTARTSYS)")
)

// retryContended runs op until it fails with something other than ErrContended, by the policy
// retry.ContendedOpen.
func retryContended(ctx context.Context, op func() error) error {
	isContended := func(err error) bool { return errors.Is(err, ErrContended) }
	err := retry.ContendedOpen.Do(ctx, isContended, op)
	if isContended(err) && ctx.Err() == nil {
		return fmt.Errorf("%w (after %d tries: ZFS kept the zvol's open contended; retry later)", err, retry.ContendedOpen.Tries)
	}
	return err
}

func classify(err error) error {
	var cerr *command.Error
	if !errors.As(err, &cerr) {
		return err
	}
	low := strings.ToLower(cerr.Stderr)
	switch {
	case strings.Contains(low, "busy"):
		cerr.Kind = ErrBusy
	case strings.Contains(low, "no space left"):
		cerr.Kind = ErrNoSpace
	case strings.Contains(low, "unknown error 512"):
		cerr.Kind = ErrContended
	}
	return cerr
}

// Mkfs formats dev with XFS for Docker's overlay2:
//   - ftype=1: overlay2 refuses XFS without d_type support;
//   - sector size 4096: an 8K-volblocksize zvol reports 8192-byte physical sectors, and mkfs.xfs
//     would otherwise fall back to 512-byte sectors, so every log write would be a
//     read-modify-write of a whole zvol block;
//   - -K: skip discarding a brand-new sparse device, which only costs time;
//   - the on-disk features pinned (featureArgs), whatever this mkfs.xfs defaults to.
func Mkfs(ctx context.Context, dev, label string) error {
	args := append([]string{"-q", "-f", "-K", "-s", "size=4096", "-b", "size=4096"}, featureArgs(ctx)...)
	if label != "" {
		if len(label) > 12 {
			label = label[:12] // XFS labels are at most 12 bytes
		}
		args = append(args, "-L", label)
	}
	return retryContended(ctx, func() error {
		_, err := command.Run(ctx, "mkfs.xfs", append(args, dev)...)
		return classify(err)
	})
}

// MountOptions are the XFS options every zgolden volume is mounted with.
//   - nouuid: a clone carries its golden's XFS UUID and the kernel refuses a second mount of the
//     same UUID (zfs-localpv #182). It is passed on every mount, so remounts after a plugin or host
//     restart work too.
//   - discard: space Docker frees inside the volume goes back to the pool (or punches holes in the
//     image file) instead of staying allocated for ever.
func MountOptions(discard bool) []string {
	opts := []string{"nouuid"}
	if discard {
		opts = append(opts, "discard")
	}
	return opts
}

// Mount mounts the XFS on source (a block device, or an image file when opts has "loop") at
// target. opts are XFS's own options (nouuid, discard), passed to mount(2) as they are.
//
// It makes the mount(2) call itself, attaching the loop device too, instead of running
// mount(8): the mount is on the path of every Create and container start, and mount(8) costs a
// process and libmount's reading of the whole mount table (make bench's probe, mount(8) of a
// tmpfs, takes about 50 ms in the emulated ZFS guest). Like Mkfs, it retries a zvol open that
// ZFS refused as contended (ErrContended).
func Mount(ctx context.Context, source, target string, opts []string) error {
	if err := os.MkdirAll(target, 0o755); err != nil {
		return err
	}
	loop := false
	var flags uintptr
	data := make([]string, 0, len(opts))
	for _, o := range opts {
		switch o {
		case "loop":
			loop = true
		case "ro": // a mount flag, not an XFS option
			flags |= unix.MS_RDONLY
		default:
			data = append(data, o)
		}
	}
	return retryContended(ctx, func() error {
		if !loop {
			return mountErr(source, target, data, unix.Mount(source, target, "xfs", flags, strings.Join(data, ",")))
		}
		dev, fd, err := attachLoop(source)
		if err != nil {
			return err
		}
		// The device is attached with autoclear: closing fd detaches it unless the mount holds
		// it, so a failed mount leaves no loop device behind and unmount frees it.
		err = unix.Mount(dev, target, "xfs", flags, strings.Join(data, ","))
		if err == nil {
			unix.Close(fd)
			return nil
		}
		rel := loopHeld(dev) // read while fd still holds it attached
		unix.Close(fd)
		rel.wait() // the image is free again when Mount fails, as after Unmount
		return mountErr(dev+" ("+source+")", target, data, err)
	})
}

// mountErr words a failed mount(2) for the volume's user and classifies it like classify does
// mount(8)'s messages; nil stays nil.
func mountErr(source, target string, data []string, err error) error {
	if err == nil {
		return nil
	}
	var errno unix.Errno
	if !errors.As(err, &errno) {
		return fmt.Errorf("mount %s at %s: %w", source, target, err)
	}
	e := &SysError{Op: fmt.Sprintf("mount %s at %s (xfs, %s)", source, target, strings.Join(data, ",")), Errno: errno}
	switch errno {
	case unix.EBUSY:
		e.Kind, e.Hint = ErrBusy, "the device or the target is already in use"
	case unix.ENOSPC:
		e.Kind = ErrNoSpace
	case erestartsys:
		e.Kind = ErrContended
	case unix.EINVAL, unix.EUCLEAN: // EUCLEAN is how XFS reports corruption (EFSCORRUPTED)
		e.Hint = "the kernel refused the filesystem; its XFS messages in dmesg say why (a duplicate UUID, a damaged log or superblock)"
	}
	return e
}

// erestartsys is the kernel's internal ERESTARTSYS, which a contended zvol_open leaks to user
// space (see ErrContended); Go's unix.Errno has no name for it.
const erestartsys = unix.Errno(512)

// SysError is a failed system call of this package: Op names what was tried on what, Errno is
// the kernel's answer (errors.Is matches it), and Kind, when set, is the sentinel callers act on.
type SysError struct {
	Op    string
	Errno unix.Errno
	Kind  error
	Hint  string
}

func (e *SysError) Error() string {
	msg := e.Op + ": " + e.Errno.Error()
	if e.Errno == erestartsys {
		msg = e.Op + ": ERESTARTSYS (errno 512, \"Unknown error 512\")"
	}
	if e.Hint != "" {
		msg += "; " + e.Hint
	}
	return msg
}

// Unwrap lets errors.Is match both the errno and the sentinel.
func (e *SysError) Unwrap() []error {
	if e.Kind == nil {
		return []error{e.Errno}
	}
	return []error{e.Errno, e.Kind}
}

// MountFS mounts a non-XFS filesystem (a ZFS dataset with mountpoint=legacy, for example).
func MountFS(ctx context.Context, fstype, source, target string, opts []string) error {
	if err := os.MkdirAll(target, 0o755); err != nil {
		return err
	}
	args := []string{"-t", fstype}
	if len(opts) > 0 {
		args = append(args, "-o", strings.Join(opts, ","))
	}
	_, err := command.Run(ctx, "mount", append(args, source, target)...)
	return classify(err)
}

// Unmount unmounts target. It never detaches lazily: `umount -l` leaves the device open, and a
// later zfs destroy then fails with "dataset is busy" (openzfs #9359). A busy target is returned as
// ErrBusy for the caller to report.
//
// Like Mount, it makes the system call itself: every container stop and Remove passes here.
// When target's filesystem sits on a loop device, Unmount returns once the device has let go of
// its image (see loopRelease.wait), so the image can be copied, removed or its filesystem
// unmounted at once.
func Unmount(ctx context.Context, target string) error {
	rel := loopUnder(target)
	err := unix.Unmount(target, 0)
	if err == nil {
		rel.wait()
		return nil
	}
	var errno unix.Errno
	if !errors.As(err, &errno) {
		return fmt.Errorf("unmount %s: %w", target, err)
	}
	e := &SysError{Op: "unmount " + target, Errno: errno}
	switch e.Errno {
	case unix.EBUSY:
		e.Kind, e.Hint = ErrBusy, "a process still has files open under it"
	case unix.EINVAL:
		e.Hint = "it is not a mount point"
	}
	return e
}

// Freeze and Thaw bracket a snapshot so the XFS on disk is consistent and clones need no log replay.
func Freeze(ctx context.Context, mountpoint string) error {
	_, err := command.Run(ctx, "xfs_freeze", "-f", mountpoint)
	return classify(err)
}

// Thaw undoes Freeze.
func Thaw(ctx context.Context, mountpoint string) error {
	_, err := command.Run(ctx, "xfs_freeze", "-u", mountpoint)
	return classify(err)
}

// Frozen runs act with the XFS mounted at mountpoint synced and frozen, so that a snapshot or a
// reflink that act takes is consistent on disk and its clones mount without log replay
// (docs/design-facts.md, "Freeze before a snapshot"). An empty mountpoint (nothing mounted) runs
// act alone. The thaw runs whatever act did, on a context of its own: a cancelled caller must
// never leave a volume frozen, which would hang every writer in it. act's error comes first.
func Frozen(ctx context.Context, mountpoint string, act func() error) error {
	if mountpoint == "" {
		return act()
	}
	if err := Sync(mountpoint); err != nil {
		return fmt.Errorf("sync %s before freezing it: %w", mountpoint, err)
	}
	if err := Freeze(ctx, mountpoint); err != nil {
		return fmt.Errorf("freeze %s: %w", mountpoint, err)
	}
	aerr := act()
	tctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	defer cancel()
	if terr := Thaw(tctx, mountpoint); terr != nil {
		terr = fmt.Errorf("thaw %s (run xfs_freeze -u on it): %w", mountpoint, terr)
		if aerr == nil {
			return terr
		}
		return errors.Join(aerr, terr)
	}
	return aerr
}

// Grow grows a mounted XFS to fill its device.
func Grow(ctx context.Context, mountpoint string) error {
	_, err := command.Run(ctx, "xfs_growfs", mountpoint)
	return classify(err)
}

// Mount describes one entry of the mount table.
type MountEntry struct {
	Source     string
	Mountpoint string
	FSType     string
	Options    string
	Dev        uint64 // the filesystem's device number, as stat reports it in st_dev
}

// MountedAt returns the mount at target, if any. The kernel's mount table is the source of truth
// for whether a volume is mounted; nothing about it is cached.
func MountedAt(target string) (*MountEntry, error) {
	target = filepath.Clean(target)
	mounts, err := mountinfo.GetMounts(mountinfo.SingleEntryFilter(target))
	if err != nil {
		return nil, err
	}
	if len(mounts) == 0 {
		return nil, nil
	}
	m := mounts[len(mounts)-1] // the topmost mount is the one a caller sees
	e := entry(m)
	return &e, nil
}

// IsMountpoint says whether target is a mountpoint (false when it does not exist). Where the
// kernel can answer (openat2 with RESOLVE_NO_XDEV, Linux 5.6 and later) it does so without
// reading the mount table, which MountedAt parses whole: the driver asks on every Mount and
// Unmount, and a host running many sessions has thousands of mounts.
//
// The kernel's answer needs a stat of target, and an XFS that has shut down (its device failed
// a write, as a full thin zvol's does) answers every stat with EIO while it stays mounted: the
// volume must then still read as mounted, so that its Unmount unmounts it. On any error but
// ENOENT the mount table, which needs no stat, answers instead.
func IsMountpoint(target string) (bool, error) {
	target = filepath.Clean(target)
	ok, err := mountinfo.Mounted(target)
	switch {
	case err == nil:
		return ok, nil
	case errors.Is(err, fs.ErrNotExist):
		return false, nil
	}
	m, merr := MountedAt(target)
	if merr != nil {
		return false, fmt.Errorf("is %s a mountpoint: %w (and the mount table: %v)", target, err, merr)
	}
	return m != nil, nil
}

func entry(m *mountinfo.Info) MountEntry {
	return MountEntry{Source: m.Source, Mountpoint: m.Mountpoint, FSType: m.FSType, Options: m.VFSOptions,
		Dev: unix.Mkdev(uint32(m.Major), uint32(m.Minor))}
}

// MountsUnder returns every mount at or below root.
func MountsUnder(root string) ([]MountEntry, error) {
	mounts, err := mountinfo.GetMounts(mountinfo.PrefixFilter(filepath.Clean(root)))
	if err != nil {
		return nil, err
	}
	out := make([]MountEntry, 0, len(mounts))
	for _, m := range mounts {
		out = append(out, entry(m))
	}
	return out, nil
}

// UnmountRetry unmounts target, retrying a busy target up to attempts times by the policy
// retry.BusyUnmount: udev and blkid probes hold a fresh device open for a moment. A target that
// stays busy is reported, never lazily detached.
func UnmountRetry(ctx context.Context, target string, attempts int) error {
	isBusy := func(err error) bool { return errors.Is(err, ErrBusy) }
	err := retry.BusyUnmount.WithTries(uint(max(attempts, 1))).Do(ctx, isBusy, func() error { return Unmount(ctx, target) })
	if isBusy(err) {
		return fmt.Errorf("%w: a process still has files open under %s (find it with `fuser -vm %s`)", err, target, target)
	}
	return err
}

// featureArgs pins the XFS features of every volume and golden to one set that each kernel
// zgolden supports mounts, Linux 6.1 (Debian 12) through 6.12 (Debian 13) and later: a golden
// made on one host is cloned and mounted on others (docs/design-facts.md, "XFS features"). It is
// Debian 12's mkfs.xfs 6.1 defaults, written out: Debian 13's 6.13 turns on rmapbt and nrext64
// (large extent counts, experimental before Linux 6.10). The switches of features newer than
// 6.1's mkfs (exchange, parent, metadir) are passed only to a mkfs.xfs that knows them, and
// they stay off.
func featureArgs(ctx context.Context) []string {
	meta := "crc=1,finobt=1,reflink=1,rmapbt=0,bigtime=1,inobtcount=1"
	inode := "sparse=1,nrext64=0"
	naming := "ftype=1"
	v := mkfsVersion(ctx)
	if v[0] > 6 || v[0] == 6 && v[1] >= 10 {
		inode += ",exchange=0"
		naming += ",parent=0"
	}
	if v[0] > 6 || v[0] == 6 && v[1] >= 13 {
		meta += ",metadir=0"
	}
	return []string{"-m", meta, "-i", inode, "-n", naming}
}

var mkfsVer struct {
	once sync.Once
	v    [2]int
}

// mkfsVersion is mkfs.xfs's major and minor version ({0, 0} when it does not say).
func mkfsVersion(ctx context.Context) [2]int {
	mkfsVer.once.Do(func() {
		out, err := command.Run(ctx, "mkfs.xfs", "-V")
		if err != nil {
			return
		}
		mkfsVer.v = parseMkfsVersion(string(out))
	})
	return mkfsVer.v
}

// parseMkfsVersion reads "mkfs.xfs version 6.13.0".
func parseMkfsVersion(s string) [2]int {
	_, ver, ok := strings.Cut(strings.TrimSpace(s), "version ")
	if !ok {
		return [2]int{}
	}
	parts := strings.SplitN(ver, ".", 3)
	var v [2]int
	for i := 0; i < 2 && i < len(parts); i++ {
		n, err := strconv.Atoi(parts[i])
		if err != nil {
			return [2]int{}
		}
		v[i] = n
	}
	return v
}
