package xfsutil

import (
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/zgolden/zgolden/internal/command"
)

// TreeSize is what Scan found in a directory tree.
type TreeSize struct {
	Files int64 // every inode: files, directories, symlinks, devices
	Bytes int64 // apparent size of regular files
}

// Scan walks src and counts what a copy will have to make, for progress and an estimate.
func Scan(ctx context.Context, src string) (TreeSize, error) {
	var t TreeSize
	err := filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		t.Files++
		if d.Type().IsRegular() {
			if info, err := d.Info(); err == nil {
				t.Bytes += info.Size()
			}
		}
		return nil
	})
	return t, err
}

// CopyTree copies the contents of src into dst (an empty, mounted filesystem) with cp -a
// semantics: ownership, modes, timestamps, hard links, symlinks, xattrs and ACLs are preserved, and
// sparse files stay sparse. The copy is then verified entry by entry (VerifyTree). progress, if not nil, is called about once a second with the inodes
// and bytes written so far, read from dst's filesystem counters, since cp reports nothing.
func CopyTree(ctx context.Context, src, dst string, progress func(files, bytes int64)) error {
	base, _ := usage(dst)
	done := make(chan struct{})
	if progress != nil {
		go func() {
			t := time.NewTicker(time.Second)
			defer t.Stop()
			for {
				select {
				case <-done:
					return
				case <-t.C:
					if u, err := usage(dst); err == nil {
						progress(u.Files-base.Files, u.Bytes-base.Bytes)
					}
				}
			}
		}()
	}
	// "src/." copies the directory's contents, hidden files included, into dst itself.
	// --reflink=never: the source is on another filesystem (or the point is a real copy).
	_, err := command.Run(ctx, "cp", "-a", "--sparse=always", "--reflink=never", "--no-target-directory", src+"/.", dst)
	close(done)
	if err == nil {
		// Nothing is trusted as a golden (and no source is ever deleted) unless it verifies.
		err = VerifyTree(ctx, src, dst)
	}
	if err == nil && progress != nil {
		if u, uerr := usage(dst); uerr == nil {
			progress(u.Files-base.Files, u.Bytes-base.Bytes)
		}
	}
	return classify(err)
}

func usage(path string) (TreeSize, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return TreeSize{}, err
	}
	return TreeSize{
		Files: int64(st.Files - st.Ffree),
		Bytes: int64(st.Blocks-st.Bfree) * st.Bsize,
	}, nil
}

// FreeSpace returns the bytes available to unprivileged writers and the total size of the
// filesystem holding path.
func FreeSpace(path string) (free, total uint64, err error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return 0, 0, err
	}
	return st.Bavail * uint64(st.Bsize), st.Blocks * uint64(st.Bsize), nil
}

// SyncDir makes a create, rename or unlink in dir durable: the records zgolden keeps beside ZFS
// (claims, removals, mount references, image renames) are true only once their directory is.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// Sync flushes the filesystem holding path.
func Sync(path string) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return unix.Syncfs(fd)
}
