package main

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/zgolden/zgolden/driver"
)

// Reaping of abandoned volumes (--reap-unused-after, `zgolden volume reap`).
//
// A volume is abandoned when no container, running or stopped, has referenced it for the
// configured time: a crashed orchestrator leaks its sessions' volumes, and `docker volume prune`
// removes only anonymous ones. The rules:
//   - Only Docker knows which containers reference a volume, so each pass asks it (engine.inUse);
//     while Docker cannot be reached, nothing is reaped.
//   - A volume mounted through zgolden, or listed for any container, is in use now. Otherwise it
//     has been idle since the last pass that saw it in use, its creation, or this process's start,
//     whichever is latest: a restart forgets when a volume was last used, so it waits longer,
//     never less.
//   - The removal goes through Docker (VolumeRemove), which refuses a volume a container took in
//     the meantime and keeps its own bookkeeping whole, and then calls the plugin's Remove.
//   - Every reap is logged with the volume and how long it was idle.
type reaper struct {
	d     *driver.Driver
	e     *engine
	after time.Duration // 0: no background passes
	log   *logrus.Entry
	start time.Time

	mu      sync.Mutex
	lastRef map[string]time.Time // volume -> last pass that saw it in use
}

// reapMin is the shortest --reap-unused-after: a Create and the container that mounts it are
// seconds apart, and an orchestrator may create volumes well ahead of their containers.
const reapMin = 10 * time.Minute

// reapDecision is one volume a pass reaped, or would reap with --dry-run.
type reapDecision struct {
	Volume      string    `json:"volume"`
	IdleSince   time.Time `json:"idle_since"`
	IdleSeconds float64   `json:"idle_seconds"`
	Reason      string    `json:"reason"`
	Removed     bool      `json:"removed"`
	Error       string    `json:"error,omitempty"`
}

func newReaper(d *driver.Driver, e *engine, after time.Duration, log *logrus.Entry) *reaper {
	return &reaper{d: d, e: e, after: after, log: log.WithField("worker", "reaper"), start: time.Now(), lastRef: map[string]time.Time{}}
}

// pass reaps (or with dryRun lists) the volumes idle for at least after.
func (r *reaper) pass(ctx context.Context, after time.Duration, dryRun bool) ([]reapDecision, error) {
	qctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	used, err := r.e.inUse(qctx)
	cancel()
	if err != nil {
		return nil, fmt.Errorf("cannot ask the Docker engine which volumes its containers use, so nothing is reaped: %w", err)
	}
	now := time.Now()
	var out []reapDecision
	present := map[string]bool{}
	for _, v := range r.d.List() {
		present[v.Name] = true
		r.mu.Lock()
		if v.Mounts > 0 || used[v.Name] {
			r.lastRef[v.Name] = now
			r.mu.Unlock()
			continue
		}
		since := r.start
		for _, t := range []time.Time{r.lastRef[v.Name], v.CreatedAt} {
			if t.After(since) {
				since = t
			}
		}
		r.mu.Unlock()
		idle := now.Sub(since)
		if idle < after {
			continue
		}
		dec := reapDecision{Volume: v.Name, IdleSince: since.UTC(), IdleSeconds: idle.Seconds(),
			Reason: fmt.Sprintf("no container has referenced it for %s, longer than %s", idle.Round(time.Second), after)}
		if !dryRun {
			rctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
			err := r.e.removeVolume(rctx, v.Name)
			cancel()
			l := r.log.WithFields(logrus.Fields{"volume": v.Name, "idle": idle.Round(time.Second).String()})
			if err != nil {
				dec.Error = err.Error()
				l.WithError(err).Warn("could not reap an unused volume")
			} else {
				dec.Removed = true
				l.Info("reaped a volume no container had used")
			}
		}
		out = append(out, dec)
	}
	r.mu.Lock()
	for name := range r.lastRef {
		if !present[name] {
			delete(r.lastRef, name)
		}
	}
	r.mu.Unlock()
	return out, nil
}

// touch records that volume name was used now (a Mount or an Unmount through the plugin), so a
// container that came and went between two passes still counts.
func (r *reaper) touch(name string) {
	if r == nil {
		return
	}
	r.mu.Lock()
	r.lastRef[name] = time.Now()
	r.mu.Unlock()
}

// run makes a pass every interval until ctx is done.
func (r *reaper) run(ctx context.Context) {
	every := min(r.after/10, time.Minute)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		if _, err := r.pass(ctx, r.after, false); err != nil && ctx.Err() == nil {
			r.log.WithError(err).Warn("reap pass skipped")
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
