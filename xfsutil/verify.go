package xfsutil

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"syscall"

	"golang.org/x/sys/unix"
)

// VerifyTree checks, entry by entry, that dst holds what src holds: the same types, permission
// bits, ownership, sizes, modification times (of everything but directories' own entries list),
// symlink targets, extended attributes and hard-link groups. It is what makes deleting a legacy
// golden directory after an import safe.
func VerifyTree(ctx context.Context, src, dst string) error {
	links := map[uint64]uint64{} // src inode -> dst inode, to check hard-link groups
	n := 0
	err := filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if n++; n%4096 == 0 && ctx.Err() != nil {
			return ctx.Err()
		}
		rel, _ := filepath.Rel(src, path)
		other := filepath.Join(dst, rel)
		var a, b syscall.Stat_t
		if err := syscall.Lstat(path, &a); err != nil {
			return err
		}
		if err := syscall.Lstat(other, &b); err != nil {
			return fmt.Errorf("%s: missing from the copy: %w", rel, err)
		}
		if a.Mode != b.Mode || a.Uid != b.Uid || a.Gid != b.Gid {
			return fmt.Errorf("%s: mode/owner %o %d:%d in the source, %o %d:%d in the copy", rel, a.Mode, a.Uid, a.Gid, b.Mode, b.Uid, b.Gid)
		}
		if a.Mode&syscall.S_IFMT == syscall.S_IFREG {
			if a.Size != b.Size {
				return fmt.Errorf("%s: %d bytes in the source, %d in the copy", rel, a.Size, b.Size)
			}
			if a.Mtim != b.Mtim {
				return fmt.Errorf("%s: modification time differs in the copy", rel)
			}
			if a.Nlink > 1 {
				if want, seen := links[a.Ino]; seen && want != b.Ino {
					return fmt.Errorf("%s: a hard link in the source is a separate file in the copy", rel)
				}
				links[a.Ino] = b.Ino
			}
		}
		if d.Type()&fs.ModeSymlink != 0 {
			t1, err1 := os.Readlink(path)
			t2, err2 := os.Readlink(other)
			if err := errors.Join(err1, err2); err != nil || t1 != t2 {
				return fmt.Errorf("%s: symlink points to %q in the source, %q in the copy (%v)", rel, t1, t2, err)
			}
		}
		x1, err1 := xattrs(path)
		x2, err2 := xattrs(other)
		if err := errors.Join(err1, err2); err != nil {
			return fmt.Errorf("%s: %w", rel, err)
		}
		if len(x1) != len(x2) {
			return fmt.Errorf("%s: extended attributes differ in the copy", rel)
		}
		for k, v := range x1 {
			if w, ok := x2[k]; !ok || !bytes.Equal(v, w) {
				return fmt.Errorf("%s: extended attribute %s differs in the copy", rel, k)
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("verify the copy of %s: %w", src, err)
	}
	return nil
}

// xattrs reads every extended attribute of path without following a symlink.
func xattrs(path string) (map[string][]byte, error) {
	size, err := unix.Llistxattr(path, nil)
	if err != nil || size == 0 {
		if errors.Is(err, unix.ENOTSUP) {
			err = nil
		}
		return nil, err
	}
	buf := make([]byte, size)
	size, err = unix.Llistxattr(path, buf)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, name := range bytes.Split(buf[:size], []byte{0}) {
		if len(name) > 0 {
			names = append(names, string(name))
		}
	}
	sort.Strings(names)
	out := make(map[string][]byte, len(names))
	for _, name := range names {
		sz, err := unix.Lgetxattr(path, name, nil)
		if err != nil {
			return nil, err
		}
		val := make([]byte, sz)
		if sz > 0 {
			if sz, err = unix.Lgetxattr(path, name, val); err != nil {
				return nil, err
			}
		}
		out[name] = val[:sz]
	}
	return out, nil
}
