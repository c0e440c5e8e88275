// Package fault kills the process at a named step boundary, so tests can prove that a crash at
// any step of Create, Remove, Promote or Import loses nothing and leaks nothing.
//
// It is inert unless the plugin was started with ZGOLDEN_FAULT=POINT (read once, by main); then
// the first time execution reaches POINT the process sends itself SIGKILL: no deferred cleanup,
// no rollback, exactly like a crash or an OOM kill.
package fault

import (
	"context"
	"io"
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
// under way (claim:renaming, zfsstore/removal.go), a Create while every spare is still being
// made (spare:making, zfsstore/spares.go), or a bare volume before its properties are stored
// (settle:waiting, zfsstore/bare.go). It works with or without a fault point.
const PauseEnvVar = "ZGOLDEN_FAULT_PAUSE"

// Pauses lists every pause point.
var Pauses = []string{"claim:renaming", "spare:making", "settle:waiting"}

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
	"create:after-wait",
	"mount:after-bind",
	"unmount:after-bind",
	"claim:after-rename",
	"spare:after-clone",
	"spare:after-mount",
	"settle:after-set",
	"remove:after-record",
	"remove:during-rename",
	"remove:after-handover-record",
	"trash:after-destroy",
	"trash:after-unmount",
	"promote:after-snapshot",
	"promote:after-copy",
	"fork:after-snapshot",
	"import:after-create",
	"import:after-copy",
	"import:after-marker",
	"export:after-hold",
	"export:mid-stream",
	"receive:mid-stream",
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

// StreamAt is how far into a stream the mid-stream points (export:mid-stream,
// receive:mid-stream) fire: far enough that a resumed transfer has something to skip, near
// enough that the crash suite's small golden reaches it.
const StreamAt = 64 << 10

// Writer returns w, crashing at point once StreamAt bytes have gone through it when point is
// the configured one (w itself otherwise).
func (i *Injector) Writer(point string, w io.Writer) io.Writer {
	if i == nil || i.point != point {
		return w
	}
	return &streamFault{w: w, hit: func() { i.Hit(point) }}
}

// Reader is Writer for a stream that is read.
func (i *Injector) Reader(point string, r io.Reader) io.Reader {
	if i == nil || i.point != point {
		return r
	}
	return &streamFault{r: r, hit: func() { i.Hit(point) }}
}

type streamFault struct {
	w   io.Writer
	r   io.Reader
	n   int64
	hit func()
}

func (f *streamFault) Write(p []byte) (int, error) {
	n, err := f.w.Write(p)
	f.count(n)
	return n, err
}

func (f *streamFault) Read(p []byte) (int, error) {
	n, err := f.r.Read(p)
	f.count(n)
	return n, err
}

func (f *streamFault) count(n int) {
	if f.n += int64(n); f.n >= StreamAt {
		f.hit()
	}
}
