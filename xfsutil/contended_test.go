package xfsutil

import (
	"context"
	"errors"
	"os/exec"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/zgolden/zgolden/internal/command"
	"github.com/zgolden/zgolden/internal/retry"
)

// contended is what mount(8) printed in the ZFS guest when 32 clones were mounted at once.
func contended() error {
	return classify(&command.Error{
		Argv: []string{"mount", "-t", "xfs", "/dev/zvol/p/v", "/mnt/v"}, Err: &exec.ExitError{},
		Stderr: "mount: /mnt/v: mount(2) system call failed: Unknown error 512.\n",
	})
}

func TestContendedOpenIsRetried(t *testing.T) {
	if !errors.Is(contended(), ErrContended) {
		t.Fatalf("classify does not recognise ERESTARTSYS from a zvol open: %v", contended())
	}
	calls := 0
	err := retryContended(context.Background(), func() error {
		calls++
		if calls < 3 {
			return contended()
		}
		return nil
	})
	if err != nil || calls != 3 {
		t.Fatalf("retryContended = %v after %d calls; want success on the third", err, calls)
	}

	other := errors.New("wrong fs type")
	calls = 0
	if err := retryContended(context.Background(), func() error { calls++; return other }); !errors.Is(err, other) || calls != 1 {
		t.Fatalf("another error was retried: %v after %d calls", err, calls)
	}
}

func TestContendedOpenGivesUp(t *testing.T) {
	if testing.Short() {
		t.Skip("waits through every pause (about 6 s)")
	}
	calls := 0
	err := retryContended(context.Background(), func() error { calls++; return contended() })
	if calls != int(retry.ContendedOpen.Tries) || !errors.Is(err, ErrContended) || !strings.Contains(err.Error(), "retry later") {
		t.Fatalf("after %d calls: %v; want %d tries and an error that says to retry", calls, err, retry.ContendedOpen.Tries)
	}

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	calls = 0
	if err := retryContended(ctx, func() error { calls++; return contended() }); calls != 1 || !errors.Is(err, ErrContended) {
		t.Fatalf("a cancelled context still retried: %d calls, %v", calls, err)
	}
}

// TestContendedMountSyscall: mount(2) itself returns ERESTARTSYS as errno 512, which Mount
// classifies as contended (and so retries) like mount(8)'s "Unknown error 512".
func TestContendedMountSyscall(t *testing.T) {
	err := mountErr("/dev/zvol/p/v", "/mnt/v", []string{"nouuid"}, erestartsys)
	if !errors.Is(err, ErrContended) || !strings.Contains(err.Error(), "/dev/zvol/p/v") || !strings.Contains(err.Error(), "ERESTARTSYS") {
		t.Fatalf("mountErr(ERESTARTSYS) = %v; want ErrContended naming the device", err)
	}
	if err := mountErr("d", "t", nil, unix.EBUSY); !errors.Is(err, ErrBusy) || !errors.Is(err, unix.EBUSY) {
		t.Fatalf("mountErr(EBUSY) = %v; want ErrBusy that still matches EBUSY", err)
	}
	if mountErr("d", "t", nil, nil) != nil {
		t.Fatal("mountErr(nil) is not nil")
	}
}
