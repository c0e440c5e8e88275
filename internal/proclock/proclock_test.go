package proclock

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// TestMain lets the test binary be the second process: with ZGOLDEN_PROCLOCK_TAKE=PATH it tries
// the lock and exits 3 when another process holds it, 0 when it got it.
func TestMain(m *testing.M) {
	if p := os.Getenv("ZGOLDEN_PROCLOCK_TAKE"); p != "" {
		l, err := Take(p)
		var held *HeldError
		switch {
		case errors.As(err, &held) && held.Pid == os.Getppid():
			os.Exit(3)
		case err != nil:
			os.Stderr.WriteString(err.Error() + "\n")
			os.Exit(1)
		}
		l.Release()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func tryElsewhere(t *testing.T, path string) int {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "ZGOLDEN_PROCLOCK_TAKE="+path)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatal(err)
	}
	if code := cmd.ProcessState.ExitCode(); code != 0 && code != 3 {
		t.Fatalf("the second process failed (exit %d): %s", code, out)
	}
	return cmd.ProcessState.ExitCode()
}

// TestRefusesAnotherProcess: while this process holds the lock another process is refused and
// told this one's pid; this process takes it again (a reopen); once released, the other gets it.
func TestRefusesAnotherProcess(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lock")
	l, err := Take(path)
	if err != nil {
		t.Fatal(err)
	}
	if code := tryElsewhere(t, path); code != 3 {
		t.Fatalf("another process got the lock this one holds (exit %d)", code)
	}
	again, err := Take(path)
	if err != nil {
		t.Fatalf("this process could not take its own lock again: %v", err)
	}
	again.Release() // a POSIX lock: this drops the process's lock, which is why stores hold one
	l.Release()
	l.Release() // twice is a no-op
	if code := tryElsewhere(t, path); code != 0 {
		t.Fatalf("after Release another process still could not take the lock (exit %d)", code)
	}
	if _, err := Take(filepath.Join(t.TempDir(), "missing", "lock")); err == nil {
		t.Error("Take made a lock in a directory that does not exist")
	}
}
