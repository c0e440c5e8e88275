// Package command runs system tools as argv (never through a shell) and reports failures with the
// command line and its stderr, so an operator can see exactly what failed.
package command

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"sync"
	"time"
)

// Error is a failed command: the argv that ran, what it printed on stderr, and why it failed.
// Kind, when set by a caller that recognised the failure, is what errors.Is matches.
type Error struct {
	Argv   []string
	Stderr string
	Err    error
	Kind   error
	// Exited is closed once the process has been reaped. It is already closed unless the
	// command was abandoned (ErrAbandoned): then the process is still inside a system call and
	// what it asked the kernel for may still happen, so a caller that must undo it waits here.
	Exited <-chan struct{}
}

func (e *Error) Error() string {
	msg := strings.TrimSpace(e.Stderr)
	if msg == "" {
		msg = e.Err.Error()
	}
	return fmt.Sprintf("%s: %s", strings.Join(e.Argv, " "), msg)
}

// Unwrap exposes both the classified kind and the underlying exec error.
func (e *Error) Unwrap() []error {
	if e.Kind != nil {
		return []error{e.Kind, e.Err}
	}
	return []error{e.Err}
}

// ErrAbandoned is a command that outlived its context and did not exit when killed.
var ErrAbandoned = errors.New("still running after it was killed")

// KillGrace is how long a killed command may take to exit before Run returns without it.
//
// A zfs command that waits for its transaction group to sync sits in an uninterruptible wait in
// the kernel (txg_wait_synced), so SIGKILL takes effect only when the group has synced, which
// under heavy write load can be minutes. exec.CommandContext would kill it and then wait just as
// long in Wait, so the caller's deadline would mean nothing: Run kills, waits KillGrace, and
// returns; the process is reaped in the background.
var KillGrace = 2 * time.Second

// Run runs name with args and returns its stdout. A non-zero exit becomes an *Error.
func Run(ctx context.Context, name string, args ...string) ([]byte, error) {
	return RunIO(ctx, nil, nil, name, args...)
}

// RunIO is Run with an optional stdin and an optional stdout writer (for streams such as zfs send).
// When stdout is given, the returned bytes are nil. It returns when the command exits, or at the
// latest KillGrace after ctx is done.
func RunIO(ctx context.Context, stdin io.Reader, stdout io.Writer, name string, args ...string) ([]byte, error) {
	argv := append([]string{name}, args...)
	cmd := exec.Command(name, args...)
	var out, stderr lockedBuffer
	if stdout != nil {
		cmd.Stdout = stdout
	} else {
		cmd.Stdout = &out
	}
	cmd.Stdin = stdin
	cmd.Stderr = &stderr
	exited := make(chan struct{})
	if err := ctx.Err(); err != nil {
		close(exited)
		return nil, &Error{Argv: argv, Err: err, Exited: exited}
	}
	if err := cmd.Start(); err != nil {
		close(exited)
		return nil, &Error{Argv: argv, Err: err, Exited: exited}
	}
	done := make(chan error, 1)
	go func() {
		err := cmd.Wait()
		close(exited) // before the result: an Error that says the command exited has Exited closed
		done <- err
	}()
	var err error
	select {
	case err = <-done:
	case <-ctx.Done():
		_ = cmd.Process.Kill()
		select {
		case err = <-done:
			if err != nil {
				err = fmt.Errorf("%w (%v)", ctx.Err(), err)
			}
		case <-time.After(KillGrace):
			return nil, &Error{Argv: argv, Stderr: stderr.String(), Exited: exited,
				Err: fmt.Errorf("%w: %w; the kernel has not returned from its call (a ZFS command waits for its transaction group to sync), and it is reaped in the background", ctx.Err(), ErrAbandoned)}
		}
	}
	if err != nil {
		return nil, &Error{Argv: argv, Stderr: stderr.String(), Err: err, Exited: exited}
	}
	if stdout != nil {
		return nil, nil
	}
	return out.Bytes(), nil
}

// lockedBuffer is a bytes.Buffer that an abandoned command may still write to while RunIO reads.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func (b *lockedBuffer) Bytes() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]byte(nil), b.buf.Bytes()...)
}
