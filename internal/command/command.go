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
)

// Error is a failed command: the argv that ran, its exit code and what it printed on stderr.
// Kind, when set by a caller that recognised the failure, is what errors.Is matches.
type Error struct {
	Argv     []string
	ExitCode int
	Stderr   string
	Err      error
	Kind     error
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

// Run runs name with args and returns its stdout. A non-zero exit becomes an *Error.
func Run(ctx context.Context, name string, args ...string) ([]byte, error) {
	return RunIO(ctx, nil, nil, name, args...)
}

// RunIO is Run with an optional stdin and an optional stdout writer (for streams such as zfs send).
// When stdout is given, the returned bytes are nil.
func RunIO(ctx context.Context, stdin io.Reader, stdout io.Writer, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var out, stderr bytes.Buffer
	if stdout != nil {
		cmd.Stdout = stdout
	} else {
		cmd.Stdout = &out
	}
	cmd.Stdin = stdin
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		e := &Error{Argv: append([]string{name}, args...), ExitCode: -1, Stderr: stderr.String(), Err: err}
		var exitErr *exec.ExitError
		if errors.As(err, &exitErr) {
			e.ExitCode = exitErr.ExitCode()
		}
		if ctx.Err() != nil {
			e.Err = fmt.Errorf("%w (%v)", ctx.Err(), err)
		}
		return nil, e
	}
	if stdout != nil {
		return nil, nil
	}
	return out.Bytes(), nil
}
