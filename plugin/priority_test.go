package main

import (
	"runtime"
	"sync"
	"testing"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// niceOf reads a thread's nice value (the raw system call answers 20 - nice).
func niceOf(t *testing.T, tid int) int {
	t.Helper()
	p, err := unix.Getpriority(unix.PRIO_PROCESS, tid)
	if err != nil {
		t.Fatal(err)
	}
	return 20 - p
}

// TestSetNiceReachesEveryThread: every thread the process has gets the value, and so do threads
// the runtime makes afterwards. The test lowers its own priority (to 7), which needs no privilege.
func TestSetNiceReachesEveryThread(t *testing.T) {
	setNice(7, logrus.NewEntry(logrus.StandardLogger()))
	tids, err := threads()
	if err != nil || len(tids) < 2 {
		t.Fatalf("threads: %v, %v", tids, err)
	}
	for _, tid := range tids {
		if got := niceOf(t, tid); got != 7 {
			t.Errorf("thread %d has nice %d, want 7", tid, got)
		}
	}
	// New threads: goroutines locked to their threads while others block, so the runtime must
	// start more.
	var wg sync.WaitGroup
	release := make(chan struct{})
	got := make(chan int, 8)
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			got <- niceOf(t, unix.Gettid())
			<-release
		}()
	}
	for i := 0; i < 8; i++ {
		if n := <-got; n != 7 {
			t.Errorf("a thread made after setNice has nice %d, want 7", n)
		}
	}
	close(release)
	wg.Wait()
}

func TestNiceFlagIsChecked(t *testing.T) {
	for _, bad := range []string{"-21", "20", "x"} {
		if _, err := parseServe([]string{"--nice", bad}); err == nil {
			t.Errorf("--nice %s was accepted", bad)
		}
	}
	c, err := parseServe(nil)
	if err != nil || c.Nice != -10 {
		t.Fatalf("default --nice = %d (%v), want -10", c.Nice, err)
	}
}
