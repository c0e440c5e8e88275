package zfsutil

import (
	"strings"
	"testing"
)

func TestParseRelease(t *testing.T) {
	for in, want := range map[string]string{
		"2.1.11-1+deb12u1\n":       "2.1.11", // /sys/module/zfs/version, Debian 12
		"zfs-2.4.4-1~bpo13+1":      "2.4.4",  // zfs version, trixie-backports
		"zfs-kmod-2.3.9-0+deb13u1": "2.3.9",
		"2.2.2-0ubuntu9.1":         "2.2.2", // Ubuntu 24.04
		"2.3":                      "2.3.0",
	} {
		r, err := ParseRelease(in)
		if err != nil || r.String() != want {
			t.Errorf("ParseRelease(%q) = %v, %v; want %s", in, r, err, want)
		}
	}
	for _, in := range []string{"", "zfs", "v2", "unknown"} {
		if r, err := ParseRelease(in); err == nil {
			t.Errorf("ParseRelease(%q) = %v, want an error", in, r)
		}
	}
}

func TestCheckPair(t *testing.T) {
	rel := func(s string) Release {
		r, err := ParseRelease(s)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	proven := []string{"2.1", "2.3", "2.4"}
	for _, c := range []struct {
		module, userland string
		proven           []string
		refused          string // "" when the pair is accepted; else a word the refusal must hold
	}{
		{"2.1.11", "2.1.11", nil, ""},             // what Debian 12 ships
		{"2.4.4", "2.1.11", proven, ""},           // the managed plugin on a 2.4 host
		{"2.3.9", "2.1.11", proven, ""},           // and on a 2.3 host
		{"2.1.14", "2.1.11", nil, ""},             // an older patch of the module's own series
		{"2.2.2", "2.1.11", proven, "not proven"}, // Ubuntu 24.04: not in the test bed
		{"2.4.4", "2.1.11", nil, "host daemon"},   // a host daemon with a stale userland
		{"2.1.5", "2.1.11", proven, "newer"},      // Ubuntu 22.04's module under Debian 12's tools
		{"2.3.1", "2.3.2", proven, "newer"},       // the pair that broke zfs send -I
	} {
		err := CheckPair(rel(c.module), rel(c.userland), c.proven)
		switch {
		case c.refused == "" && err != nil:
			t.Errorf("module %s, userland %s, proven %v: refused (%v), want accepted", c.module, c.userland, c.proven, err)
		case c.refused != "" && err == nil:
			t.Errorf("module %s, userland %s, proven %v: accepted, want refused", c.module, c.userland, c.proven)
		case err != nil:
			// The refusal names both versions, so an operator can act on it.
			for _, want := range []string{c.refused, rel(c.module).String(), rel(c.userland).String()} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("module %s, userland %s: refusal %q lacks %q", c.module, c.userland, err, want)
				}
			}
		}
	}
}

func TestParseProven(t *testing.T) {
	got, err := ParseProven("2.1, 2.3 2.4")
	if err != nil || strings.Join(got, " ") != "2.1 2.3 2.4" {
		t.Fatalf("ParseProven = %v, %v", got, err)
	}
	if got, err := ParseProven(""); err != nil || len(got) != 0 {
		t.Fatalf("ParseProven(\"\") = %v, %v; want none", got, err)
	}
	for _, bad := range []string{"2.1.11", "two", "2"} {
		if _, err := ParseProven(bad); err == nil {
			t.Errorf("ParseProven(%q) accepted a non-series", bad)
		}
	}
}
