package xfsutil

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/zgolden/zgolden/internal/command"
)

// ErrNoReflink means the filesystem cannot share extents between files (FICLONE): ext4, tmpfs,
// XFS formatted with reflink=0, or two files on different filesystems.
var ErrNoReflink = errors.New("filesystem does not support reflinks")

// Clone makes dst (an empty file open for writing) share all of src's data extents, with the
// FICLONE ioctl. It takes time proportional to src's extent count, not its size, and copies no
// extended attributes. The kernel flushes src's dirty pages first, so a file written through a
// loop device is cloned as its filesystem last wrote it.
func Clone(dst, src *os.File) error {
	err := unix.IoctlFileClone(int(dst.Fd()), int(src.Fd()))
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.ENOSPC), errors.Is(err, unix.EDQUOT):
		// Shared extents still need refcount metadata, which can run out of space.
		return fmt.Errorf("%w: reflink %s to %s: %v", ErrNoSpace, src.Name(), dst.Name(), err)
	case noReflink(err):
		return fmt.Errorf("%w: reflink %s to %s: %v", ErrNoReflink, src.Name(), dst.Name(), err)
	}
	return &os.PathError{Op: "reflink (FICLONE) from " + src.Name(), Path: dst.Name(), Err: err}
}

// noReflink recognises what FICLONE returns where reflinks cannot work: EOPNOTSUPP (ext4, tmpfs,
// XFS without reflink), EXDEV (across filesystems), EINVAL and ENOTTY (filesystems and kernels
// that predate the ioctl).
func noReflink(err error) bool {
	for _, e := range []error{unix.EOPNOTSUPP, unix.EXDEV, unix.EINVAL, unix.ENOTTY, unix.ENOSYS} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// ReflinkSupported reports whether files in dir can be reflinked, by cloning a small probe file
// there: the filesystem type alone cannot tell (XFS may be formatted with reflink=0).
func ReflinkSupported(dir string) (bool, error) {
	src, err := os.CreateTemp(dir, ".zgolden-probe-*")
	if err != nil {
		return false, err
	}
	defer os.Remove(src.Name())
	defer src.Close()
	if _, err := src.Write(make([]byte, 4096)); err != nil {
		return false, err
	}
	dst, err := os.CreateTemp(dir, ".zgolden-probe-*")
	if err != nil {
		return false, err
	}
	defer os.Remove(dst.Name())
	defer dst.Close()
	err = Clone(dst, src)
	if errors.Is(err, ErrNoReflink) {
		return false, nil
	}
	return err == nil, err
}

// FSType names the type of the filesystem holding path, from statfs, for decisions and messages.
func FSType(path string) (string, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return "", err
	}
	switch int64(st.Type) {
	case unix.XFS_SUPER_MAGIC:
		return "xfs", nil
	case unix.BTRFS_SUPER_MAGIC:
		return "btrfs", nil
	case unix.EXT4_SUPER_MAGIC: // also ext2 and ext3, which share the magic
		return "ext4", nil
	case unix.TMPFS_MAGIC:
		return "tmpfs", nil
	case unix.OVERLAYFS_SUPER_MAGIC:
		return "overlay", nil
	case 0x2fc12fc1:
		return "zfs", nil
	}
	return fmt.Sprintf("0x%x", st.Type), nil
}

// MkfsReflink formats dev (typically an image file) as an XFS that can hold reflinked files:
// reflink=1 is spelled out because older mkfs.xfs versions default to reflink=0. -K skips
// discarding a brand-new sparse file, which only costs time.
func MkfsReflink(ctx context.Context, dev, label string) error {
	args := []string{"-q", "-f", "-K", "-m", "reflink=1"}
	if label != "" {
		if len(label) > 12 {
			label = label[:12] // XFS labels are at most 12 bytes
		}
		args = append(args, "-L", label)
	}
	_, err := command.Run(ctx, "mkfs.xfs", append(args, dev)...)
	return classify(err)
}

// Extents is a file's allocation as FIEMAP reports it.
type Extents struct {
	Allocated uint64 // bytes in allocated extents (written, unwritten or delayed)
	Shared    uint64 // of those, bytes in extents shared with another file (reflinks)
}

// Exclusive is the allocated space only this file holds: what deleting it would free.
func (e Extents) Exclusive() uint64 { return e.Allocated - e.Shared }

// FIEMAP's ABI (linux/fiemap.h); golang.org/x/sys has no wrapper for it.
const (
	fsIocFiemap        = 0xC020660B // _IOWR('f', 11, struct fiemap)
	fiemapExtentLast   = 0x1
	fiemapExtentShared = 0x2000
	fiemapBatch        = 512
)

type fiemapHeader struct {
	Start, Length               uint64
	Flags, Mapped, Count, Spare uint32
}

type fiemapExtent struct {
	Logical, Physical, Length uint64
	Spare64                   [2]uint64
	Flags                     uint32
	Spare                     [3]uint32
}

// FileExtents sums f's extents. XFS and btrfs mark reflinked extents shared (btrfs per whole
// extent, so a partly shared extent counts as shared). Dirty pages not yet written back are not
// synced first, so a mounted image reads as of its last writeback: this is for reports, not for
// decisions.
func FileExtents(f *os.File) (Extents, error) {
	hdr := unsafe.Sizeof(fiemapHeader{})
	ext := unsafe.Sizeof(fiemapExtent{})
	// []uint64 keeps the buffer 8-byte aligned for the kernel's u64 fields.
	buf := make([]uint64, (hdr+fiemapBatch*ext)/8)
	var e Extents
	var start uint64
	for {
		clear(buf)
		h := (*fiemapHeader)(unsafe.Pointer(&buf[0]))
		h.Start, h.Length, h.Count = start, math.MaxUint64-start, fiemapBatch
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), fsIocFiemap, uintptr(unsafe.Pointer(&buf[0])))
		if errno != 0 {
			return e, &os.PathError{Op: "FIEMAP", Path: f.Name(), Err: errno}
		}
		if h.Mapped == 0 {
			return e, nil
		}
		exts := unsafe.Slice((*fiemapExtent)(unsafe.Add(unsafe.Pointer(&buf[0]), hdr)), h.Mapped)
		for _, x := range exts {
			e.Allocated += x.Length
			if x.Flags&fiemapExtentShared != 0 {
				e.Shared += x.Length
			}
			start = x.Logical + x.Length
			if x.Flags&fiemapExtentLast != 0 {
				runtime.KeepAlive(buf)
				return e, nil
			}
		}
	}
}

// CopyCompact copies src's data into dst, an empty file on the same or another filesystem, and
// gives dst src's size: segment by segment as SEEK_DATA and SEEK_HOLE find them, each segment
// preallocated before it is written, so holes stay holes and each data segment lands in as few
// extents as the free space allows. It never shares extents (no FICLONE, no copy_file_range).
//
// It exists because FICLONE takes time proportional to the source's extent count. An image
// filled through a loop device is written in whatever order writeback chose, and its file ends
// up in thousands of small extents (2,660 for a golden of 100k files, measured), which made every
// clone of it cost tens of milliseconds more per 100k files; a compact copy has a handful.
func CopyCompact(ctx context.Context, dst, src *os.File) error {
	fi, err := src.Stat()
	if err != nil {
		return err
	}
	size := fi.Size()
	buf := make([]byte, 4<<20)
	sfd, dfd := int(src.Fd()), int(dst.Fd())
	for off := int64(0); off < size; {
		if err := ctx.Err(); err != nil {
			return err
		}
		data, err := unix.Seek(sfd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) { // nothing but a hole up to the end
			break
		}
		if err != nil {
			return &os.PathError{Op: "seek data", Path: src.Name(), Err: err}
		}
		hole, err := unix.Seek(sfd, data, unix.SEEK_HOLE)
		if err != nil {
			return &os.PathError{Op: "seek hole", Path: src.Name(), Err: err}
		}
		if err := unix.Fallocate(dfd, 0, data, hole-data); err != nil {
			if errors.Is(err, unix.ENOSPC) {
				return fmt.Errorf("%w: copy %s: %v", ErrNoSpace, src.Name(), err)
			}
			return &os.PathError{Op: "fallocate", Path: dst.Name(), Err: err}
		}
		for pos := data; pos < hole; {
			n, err := src.ReadAt(buf[:min(int64(len(buf)), hole-pos)], pos)
			if n > 0 {
				if _, werr := dst.WriteAt(buf[:n], pos); werr != nil {
					return werr
				}
				pos += int64(n)
			}
			if err != nil && !(errors.Is(err, io.EOF) && pos >= hole) {
				return err
			}
		}
		off = hole
	}
	return dst.Truncate(size)
}
