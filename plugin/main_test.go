package main

import (
	"bytes"
	"errors"
	"flag"
	"regexp"
	"strings"
	"testing"
)

var flagLine = regexp.MustCompile(`(?m)^\s+-(\S+)`)

// TestUsageListsEveryFlag: every admin subcommand answers --help with success, and the usage line
// the top-level help shows for it names every flag it defines (the common --admin-socket is
// explained once, below the list).
func TestUsageListsEveryFlag(t *testing.T) {
	for _, c := range commands {
		if c.path == "serve" || c.path == "version" {
			continue
		}
		var buf bytes.Buffer
		helpOut = &buf
		err := run(append(strings.Fields(c.path), "--help"))
		helpOut = nil
		if !errors.Is(err, flag.ErrHelp) {
			t.Errorf("zgolden %s --help: %v, want flag.ErrHelp (exit 0)", c.path, err)
		}
		flags := flagLine.FindAllStringSubmatch(buf.String(), -1)
		if len(flags) == 0 {
			t.Errorf("zgolden %s --help listed no flags:\n%s", c.path, buf.String())
		}
		for _, f := range flags {
			if f[1] != "admin-socket" && !strings.Contains(c.args, "--"+f[1]) {
				t.Errorf("usage line %q does not name --%s", synopsis(c.path), f[1])
			}
		}
		if !strings.Contains(usage(""), synopsis(c.path)) {
			t.Errorf("usage does not list %q", synopsis(c.path))
		}
	}
}

func TestGoldenHelp(t *testing.T) {
	for _, arg := range []string{"--help", "-h", "help"} {
		if err := run([]string{"golden", arg}); err != nil {
			t.Errorf("zgolden golden %s: %v, want success", arg, err)
		}
	}
	if err := run([]string{"golden", "bogus"}); err == nil || !strings.Contains(err.Error(), `"bogus"`) {
		t.Errorf("zgolden golden bogus: %v, want an error naming it", err)
	}
	if got := usage("golden"); strings.Contains(got, "zgolden status") || !strings.Contains(got, "zgolden golden rm") {
		t.Errorf("usage(golden) = %q, want the golden subcommands only", got)
	}
}
