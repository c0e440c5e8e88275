// Package proclock takes the per-process file lock that keeps a second zgolden off a store's
// files.
//
// A POSIX lock (fcntl), not flock: it belongs to the process, so a store reopened in the same
// process (as tests simulate a restart) takes it again, while any other process is refused, and
// the kernel releases it when the process dies, kill -9 included. The descriptor stays a raw one,
// never an os.File: closing any descriptor of the file drops a POSIX lock, and os.File's
// finalizer closes.
package proclock

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Lock is a held lock; Release lets it go.
type Lock struct{ fd int }

// HeldError says that another process holds the lock.
type HeldError struct {
	Path string
	Pid  int // the holder, as the kernel reports it (0 if it could not say)
}

func (e *HeldError) Error() string {
	return fmt.Sprintf("%s is locked by another process (pid %d)", e.Path, e.Pid)
}

// Take locks path, creating the file (not its directory), without waiting: a lock another
// process holds is a *HeldError.
func Take(path string) (*Lock, error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CREAT|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	lk := unix.Flock_t{Type: unix.F_WRLCK}
	if err := unix.FcntlFlock(uintptr(fd), unix.F_SETLK, &lk); err != nil {
		holder := unix.Flock_t{Type: unix.F_WRLCK}
		_ = unix.FcntlFlock(uintptr(fd), unix.F_GETLK, &holder)
		unix.Close(fd)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EACCES) {
			return nil, &HeldError{Path: path, Pid: int(holder.Pid)}
		}
		return nil, &os.PathError{Op: "lock", Path: path, Err: err}
	}
	return &Lock{fd: fd}, nil
}

// Release lets the lock go; a nil Lock is a no-op.
func (l *Lock) Release() {
	if l != nil && l.fd >= 0 {
		unix.Close(l.fd)
		l.fd = -1
	}
}
