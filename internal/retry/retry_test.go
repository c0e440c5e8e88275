package retry

import (
	"context"
	"errors"
	"testing"
	"time"
)

var errAgain, errFinal = errors.New("again"), errors.New("final")

func isAgain(err error) bool { return errors.Is(err, errAgain) }

func TestDoStopsAtTheBound(t *testing.T) {
	p := Policy{Name: "t", First: time.Microsecond, Factor: 2, Max: time.Millisecond, Tries: 4}
	calls := 0
	err := p.Do(context.Background(), isAgain, func() error { calls++; return errAgain })
	if !errors.Is(err, errAgain) || calls != 4 {
		t.Fatalf("Do = %v after %d calls; want errAgain after 4", err, calls)
	}
}

func TestDoStopsAtAnErrorItMustNotRetry(t *testing.T) {
	p := Policy{Name: "t", First: time.Microsecond, Factor: 1, Max: time.Microsecond, Tries: 10}
	calls := 0
	err := p.Do(context.Background(), isAgain, func() error {
		calls++
		if calls == 2 {
			return errFinal
		}
		return errAgain
	})
	if err != errFinal || calls != 2 {
		t.Fatalf("Do = %#v after %d calls; want errFinal itself after 2", err, calls)
	}
	calls = 0
	if err := p.WithTries(1).Do(context.Background(), isAgain, func() error { calls++; return errFinal }); err != errFinal || calls != 1 {
		t.Fatalf("one try: Do = %#v after %d calls; want errFinal itself", err, calls)
	}
	if err := p.Do(context.Background(), isAgain, func() error { return nil }); err != nil {
		t.Fatalf("Do of a success = %v", err)
	}
}

func TestPoll(t *testing.T) {
	p := Policy{Name: "the thing", First: time.Microsecond, Factor: 2, Max: time.Millisecond, Tries: 5}
	calls := 0
	if err := p.Poll(context.Background(), func() (bool, error) { calls++; return calls == 3, nil }); err != nil || calls != 3 {
		t.Fatalf("Poll = %v after %d calls; want nil after 3", err, calls)
	}
	calls = 0
	err := p.Poll(context.Background(), func() (bool, error) { calls++; return false, nil })
	if !errors.Is(err, ErrGaveUp) || calls != 5 || err.Error() != "gave up waiting: the thing" {
		t.Fatalf("Poll = %v after %d calls; want ErrGaveUp naming the policy after 5", err, calls)
	}
	if err := p.Poll(context.Background(), func() (bool, error) { return false, errFinal }); err != errFinal {
		t.Fatalf("Poll of a failing check = %#v; want errFinal itself", err)
	}
	err = p.WithinTime(5*time.Millisecond).WithTries(0).Poll(context.Background(), func() (bool, error) { return false, nil })
	if !errors.Is(err, ErrGaveUp) {
		t.Fatalf("Poll bounded by time = %v; want ErrGaveUp", err)
	}
}

func TestContextEndsTheWait(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	p := Policy{Name: "t", First: time.Hour, Factor: 1, Max: time.Hour, Tries: 3}
	calls := 0
	err := p.Poll(ctx, func() (bool, error) { calls++; cancel(); return false, nil })
	if !errors.Is(err, context.Canceled) || calls != 1 {
		t.Fatalf("Poll with its context cancelled = %v after %d calls; want context.Canceled after 1", err, calls)
	}
}

func TestEveryPolicyIsBounded(t *testing.T) {
	for _, p := range []Policy{ContendedOpen, BusyUnmount, BusyDataset, LoopNode, LoopRelease, LoopDetach} {
		if p.Tries == 0 && p.Within == 0 {
			t.Errorf("policy %q has no bound of its own", p.Name)
		}
	}
	for _, p := range []Policy{DeviceNode, DeviceRenamed, PoolImport, CreatesFirst} { // bounded by their callers
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("policy %q ran without a bound", p.Name)
				}
			}()
			_ = p.Poll(context.Background(), func() (bool, error) { return true, nil })
		}()
	}
}
