// Package fault kills the process at a named step boundary, so tests can prove that a crash at
// any step of Create, Remove, Promote or Import loses nothing and leaks nothing.
//
// It is inert unless the plugin was started with ZGOLDEN_FAULT=POINT (read once, by main); then
// the first time execution reaches POINT the process sends itself SIGKILL: no deferred cleanup,
// no rollback, exactly like a crash or an OOM kill.
package fault

import (
	"context"
	"os"
	"sort"
	"strings"
	"syscall"
	"time"
)

// EnvVar names the point to crash at.
const EnvVar = "ZGOLDEN_FAULT"

// PauseEnvVar holds the process at one pause point for a while, POINT=DURATION, so that a test
// can reach a step that only a slow pool makes likely: a Remove while a claimed spare's rename is
// under way (zfsstore/removal.go). It works with or without a fault point.
const PauseEnvVar = "ZGOLDEN_FAULT_PAUSE"

// Pauses lists every pause point.
var Pauses = []string{"claim:renaming"}

// Points lists every fault point, for tests that try them all. Keep it in step with the Hit calls.
var Points = []string{
	// driver
	"create:before-reply",
	"mount:after-mount",
	"remove:after-unmount",
	"remove:after-destroy",
	"promote:before-reply",
	"import:before-reply",
	// stores
	"create:after-clone",
	"create:after-device",
	"create:after-format",
	"create:after-claim",
	"mount:after-bind",
	"unmount:after-bind",
	"claim:after-rename",
	"remove:after-record",
	"remove:during-rename",
	"remove:after-handover-record",
	"trash:after-destroy",
	"promote:after-snapshot",
	"promote:after-copy",
	"fork:after-snapshot",
	"import:after-create",
	"import:after-copy",
	"import:after-marker",
	"export:after-hold",
	"receive:after-stream",
	"receive:after-ready",
}

// Injector crashes at one point, and pauses at another. A nil *Injector never does anything.
type Injector struct {
	point     string
	pausePt   string
	pause     time.Duration
	pauseSpec string // as given, for Valid's error
}

// FromEnv returns the injector configured by ZGOLDEN_FAULT and ZGOLDEN_FAULT_PAUSE, or nil when
// both are unset.
func FromEnv() *Injector {
	p, ps := os.Getenv(EnvVar), os.Getenv(PauseEnvVar)
	if p == "" && ps == "" {
		return nil
	}
	i := &Injector{point: p, pauseSpec: ps}
	if pt, d, ok := strings.Cut(ps, "="); ok {
		if dur, err := time.ParseDuration(d); err == nil && dur > 0 {
			i.pausePt, i.pause = pt, dur
		}
	}
	return i
}

// Valid reports whether the configured points exist, so a typo fails loudly instead of testing
// nothing.
func (i *Injector) Valid() bool {
	if i == nil {
		return true
	}
	if i.pauseSpec != "" && (i.pause == 0 || !contains(Pauses, i.pausePt)) {
		return false
	}
	if i.point == "" {
		return true
	}
	n := sort.SearchStrings(sorted(), i.point)
	s := sorted()
	return n < len(s) && s[n] == i.point
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// Pause waits, if point is the configured pause point, for its duration or until ctx is done.
func (i *Injector) Pause(ctx context.Context, point string) {
	if i == nil || i.pausePt != point {
		return
	}
	select {
	case <-ctx.Done():
	case <-time.After(i.pause):
	}
}

func sorted() []string {
	s := append([]string(nil), Points...)
	sort.Strings(s)
	return s
}

// Point returns the configured point ("" when inert).
func (i *Injector) Point() string {
	if i == nil {
		return ""
	}
	return i.point
}

// Hit crashes the process if point is the configured one.
func (i *Injector) Hit(point string) {
	if i == nil || i.point != point {
		return
	}
	os.Stderr.WriteString("zgolden: fault injection: SIGKILL at " + point + "\n")
	_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
	select {} // SIGKILL cannot be caught; never run past the point
}
