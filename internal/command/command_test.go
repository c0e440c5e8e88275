package command

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestRunReportsArgvAndStderr(t *testing.T) {
	_, err := Run(context.Background(), "sh", "-c", "echo boom >&2; exit 3")
	var cerr *Error
	if !errors.As(err, &cerr) {
		t.Fatalf("want *Error, got %v", err)
	}
	if cerr.Stderr != "boom\n" || !strings.Contains(err.Error(), "sh -c") {
		t.Fatalf("error %q, stderr %q", err, cerr.Stderr)
	}
	var exitErr *exec.ExitError
	if !errors.As(err, &exitErr) || exitErr.ExitCode() != 3 {
		t.Fatalf("want exit code 3 in %v", err)
	}
	select {
	case <-cerr.Exited:
	default:
		t.Fatal("Exited is open for a command that exited")
	}
}

func TestRunKillsAtTheDeadline(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err := Run(ctx, "sleep", "30")
	if !errors.Is(err, context.DeadlineExceeded) || errors.Is(err, ErrAbandoned) {
		t.Fatalf("want a deadline error for a killable command, got %v", err)
	}
}

// A process that ignores SIGKILL for a while is what a zfs command inside txg_wait_synced is. A
// stopped process's SIGKILL still acts at once, so the test uses a child that is not ours to
// kill: Run kills the direct child (a shell), whose grandchild keeps stdout open. That is enough
// to keep Wait from returning, which is the case Run must not wait for.
func TestRunReturnsWithoutAProcessThatWillNotExit(t *testing.T) {
	if _, err := os.Stat("/bin/sh"); err != nil {
		t.Skip("no /bin/sh")
	}
	old := KillGrace
	KillGrace = 200 * time.Millisecond
	defer func() { KillGrace = old }()
	// The context ends once the shell has started its child, however long that takes on a
	// loaded machine: a fixed second was not always enough with two emulated guests beside it.
	mark := filepath.Join(t.TempDir(), "started")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			if _, err := os.Stat(mark); err == nil {
				break
			}
		}
		cancel()
	}()
	_, err := Run(ctx, "sh", "-c", `sleep 4 & : > "$1"; wait`, "sh", mark)
	var cerr *Error
	if !errors.As(err, &cerr) || !errors.Is(err, context.Canceled) {
		t.Fatalf("want a canceled *Error, got %v", err)
	}
	if _, serr := os.Stat(mark); serr != nil {
		t.Fatalf("the shell never started its child within a minute: %v", serr)
	}
	if !errors.Is(err, ErrAbandoned) {
		t.Fatalf("the grandchild holds stdout, so Wait cannot return: want ErrAbandoned, got %v", err)
	}
	select {
	case <-cerr.Exited:
		t.Fatal("Exited closed before the process was reaped")
	default:
	}
	select {
	case <-cerr.Exited:
	case <-time.After(10 * time.Second):
		t.Fatal("the abandoned process was never reaped")
	}
}
