// Package fault kills the process at a named step boundary, so tests can prove that a crash at
// any step of Create, Remove, Promote or Import loses nothing and leaks nothing.
//
// It is inert unless the plugin was started with ZGOLDEN_FAULT=POINT (read once, by main); then
// the first time execution reaches POINT the process sends itself SIGKILL: no deferred cleanup,
// no rollback, exactly like a crash or an OOM kill.
package fault

import (
	"os"
	"sort"
	"syscall"
)

// EnvVar names the point to crash at.
const EnvVar = "ZGOLDEN_FAULT"

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
	"claim:after-rename",
	"remove:after-record",
	"trash:after-destroy",
	"promote:after-snapshot",
	"promote:after-copy",
	"import:after-create",
	"import:after-copy",
	"import:after-marker",
}

// Injector crashes at one point. A nil *Injector never does anything.
type Injector struct{ point string }

// FromEnv returns the injector configured by ZGOLDEN_FAULT, or nil when it is unset.
func FromEnv() *Injector {
	p := os.Getenv(EnvVar)
	if p == "" {
		return nil
	}
	return &Injector{point: p}
}

// Valid reports whether the configured point exists, so a typo fails loudly instead of testing
// nothing.
func (i *Injector) Valid() bool {
	if i == nil {
		return true
	}
	n := sort.SearchStrings(sorted(), i.point)
	s := sorted()
	return n < len(s) && s[n] == i.point
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
