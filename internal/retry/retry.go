// Package retry holds zgolden's retry and poll policies, each named for what it waits out, on
// top of cenkalti/backoff.
//
// Every loop that waits on the kernel, udev or ZFS goes through a Policy here, so the pauses,
// the bounds and what "giving up" means are written once and can be read side by side. A
// policy is always bounded (by tries, by time, or both) and always ends with its context.
package retry

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/cenkalti/backoff/v5"
)

// Policy is one named way of waiting: pauses grow from First by Factor up to Max, for at most
// Tries runs of the operation and at most Within in all (a zero bound is no bound, but a
// Policy must set at least one).
type Policy struct {
	Name   string
	First  time.Duration
	Factor float64 // 1 for an even pace
	Max    time.Duration
	Tries  uint
	Within time.Duration
}

// The policies. Each says what it waits for and why its bounds are what they are.
var (
	// ContendedOpen retries a zvol whose open fails with ERESTARTSYS while ZFS is busy with
	// other zvols' minors (seen mounting one of 32 zvols cloned at once): about 6 s of pauses in
	// all, well inside Docker's 2 minutes for Create and Mount.
	ContendedOpen = Policy{Name: "contended zvol open", First: 50 * time.Millisecond, Factor: 2, Max: 2500 * time.Millisecond, Tries: 8}
	// BusyUnmount retries an unmount refused with EBUSY: udev's and blkid's probes hold a fresh
	// device open for a moment. About 5 s for 10 tries; a target still busy then is reported,
	// never lazily detached.
	BusyUnmount = Policy{Name: "busy unmount", First: 100 * time.Millisecond, Factor: 1.5, Max: time.Second, Tries: 10}
	// BusyDataset retries a zfs destroy or rename refused with "dataset is busy", for the same
	// probes: about 1.5 s over 8 tries.
	BusyDataset = Policy{Name: "busy dataset", First: 50 * time.Millisecond, Factor: 1.5, Max: 500 * time.Millisecond, Tries: 8}
	// DeviceNode polls for a zvol's device node, which udev makes after zfs has returned: fast
	// at first (most appear within milliseconds), then every 20 ms. The caller bounds it with
	// its own timeout (Within), since every Create waits here.
	DeviceNode = Policy{Name: "zvol device node", First: time.Millisecond, Factor: 2, Max: 20 * time.Millisecond}
	// DeviceRenamed polls until a renamed zvol's old device name is gone: ZFS renames minors
	// from a task queue after zfs rename returns.
	DeviceRenamed = Policy{Name: "zvol device rename", First: 20 * time.Millisecond, Factor: 1, Max: 20 * time.Millisecond}
	// LoopNode retries opening a loop device that LOOP_CTL_GET_FREE may have just created, on a
	// /dev that is not devtmpfs and can lag: about 1 s.
	LoopNode = Policy{Name: "loop device node", First: time.Millisecond, Factor: 2, Max: 512 * time.Millisecond, Tries: 11}
	// LoopRelease polls until an autoclear loop device lets go of its image after the last
	// close, which can be udev's probe just after ours: that holds it for milliseconds, and for
	// more than 2 s with eight devices probed at once on one emulated CPU (xfsutil's
	// TestConcurrentLoopMounts in a 1-vCPU guest, whose image filesystem then would not unmount).
	LoopRelease = Policy{Name: "loop device release", First: 100 * time.Microsecond, Factor: 2, Max: 20 * time.Millisecond, Within: 10 * time.Second}
	// LoopDetach polls until no loop device backs a removed volume's image; a copy of the mount
	// in another mount namespace can keep one for as long as that namespace lives.
	LoopDetach = Policy{Name: "loop device detach", First: 20 * time.Millisecond, Factor: 1, Max: 20 * time.Millisecond, Within: 5 * time.Second}
	// PoolImport polls for the ZFS pool at boot, when the plugin can start before the pool is
	// imported; Within is --wait-pool.
	PoolImport = Policy{Name: "ZFS pool import", First: 2 * time.Second, Factor: 1, Max: 2 * time.Second}
	// CreatesFirst lets background destroys wait while Creates clone: a destroy lengthens the
	// transaction groups those clones wait on. Within is the caller's limit.
	CreatesFirst = Policy{Name: "yield to creates", First: 50 * time.Millisecond, Factor: 1, Max: 50 * time.Millisecond}
)

// ErrGaveUp is what Poll returns when its policy runs out before the condition holds.
var ErrGaveUp = errors.New("gave up waiting")

// WithTries returns p bounded by n tries instead of its own bound.
func (p Policy) WithTries(n uint) Policy { p.Tries = n; return p }

// WithinTime returns p bounded by d in all (d <= 0 means one try).
func (p Policy) WithinTime(d time.Duration) Policy {
	p.Within = max(d, time.Nanosecond)
	return p
}

func (p Policy) options() []backoff.RetryOption {
	if p.Tries == 0 && p.Within == 0 {
		panic(fmt.Sprintf("retry: policy %q has no bound", p.Name))
	}
	factor := p.Factor
	if factor < 1 {
		factor = 1
	}
	b := &backoff.ExponentialBackOff{InitialInterval: p.First, Multiplier: factor, MaxInterval: p.Max}
	return []backoff.RetryOption{backoff.WithBackOff(b), backoff.WithMaxTries(p.Tries), backoff.WithMaxElapsedTime(p.Within)}
}

// Do runs op until it succeeds, fails with an error that again does not accept, or the policy
// runs out, and returns op's last error. When ctx ends first, the error wraps both op's last
// error and the context's.
func (p Policy) Do(ctx context.Context, again func(error) bool, op func() error) error {
	var last error
	_, err := backoff.Retry(ctx, func() (struct{}, error) {
		last = op()
		if last != nil && !again(last) {
			return struct{}{}, backoff.Permanent(last)
		}
		return struct{}{}, last
	}, p.options()...)
	err = unwrap(err)
	if last != nil && err != last {
		return fmt.Errorf("%w (stopped retrying: %w)", last, err)
	}
	return err
}

// unwrap undoes backoff.Permanent, which Retry leaves on when the last try was the permanent one.
func unwrap(err error) error {
	var perm *backoff.PermanentError
	if errors.As(err, &perm) {
		return perm.Unwrap()
	}
	return err
}

// Poll calls done until it reports true (nil), fails (its error), the policy runs out (an error
// wrapping ErrGaveUp, naming the policy) or ctx ends (ctx's error).
func (p Policy) Poll(ctx context.Context, done func() (bool, error)) error {
	errWaiting := fmt.Errorf("%w: %s", ErrGaveUp, p.Name)
	_, err := backoff.Retry(ctx, func() (struct{}, error) {
		ok, err := done()
		switch {
		case err != nil:
			return struct{}{}, backoff.Permanent(err)
		case ok:
			return struct{}{}, nil
		}
		return struct{}{}, errWaiting
	}, p.options()...)
	return unwrap(err)
}
