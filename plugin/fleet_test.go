package main

import (
	"errors"
	"testing"

	"github.com/zgolden/zgolden/driver"
)

// TestPlanTransfer: a push or pull sends the sender's newest generation, from the newest one
// both hosts hold with the same guid, and nothing when the receiver has it already.
func TestPlanTransfer(t *testing.T) {
	g := func(n int, guid string) driver.Generation { return driver.Generation{Number: n, GUID: guid} }
	sender := []driver.Generation{g(1, "a1"), g(2, "a2"), g(4, "a4"), g(5, "a5")}
	for _, c := range []struct {
		name        string
		receiver    []driver.Generation
		incremental bool
		n, base     int
		upToDate    bool
	}{
		{"empty receiver", nil, true, 5, 0, false},
		{"newest shared base", []driver.Generation{g(1, "a1"), g(2, "a2")}, true, 5, 2, false},
		{"older base only", []driver.Generation{g(1, "a1")}, true, 5, 1, false},
		{"same number, other content", []driver.Generation{g(2, "b2"), g(4, "b4")}, true, 5, 0, false},
		{"skips the diverged one", []driver.Generation{g(1, "a1"), g(4, "b4")}, true, 5, 1, false},
		{"reflink: always in full", []driver.Generation{g(4, "a4")}, false, 5, 0, false},
		{"up to date", []driver.Generation{g(5, "a5")}, true, 5, 0, true},
		{"a guid not known yet is no match", []driver.Generation{g(4, "")}, true, 5, 0, false},
	} {
		n, base, upToDate, err := planTransfer("p", sender, c.receiver, c.incremental)
		if err != nil || n != c.n || base != c.base || upToDate != c.upToDate {
			t.Errorf("%s: planTransfer = %d, %d, %v, %v; want %d, %d, %v", c.name, n, base, upToDate, err, c.n, c.base, c.upToDate)
		}
	}
	if _, _, _, err := planTransfer("p", nil, nil, true); !errors.Is(err, driver.ErrNotFound) {
		t.Errorf("a sender without generations: %v; want ErrNotFound", err)
	}
}

// TestSSHTargetRefusesShellWords: the words that reach the remote shell carry no character it
// would interpret.
func TestSSHTargetRefusesShellWords(t *testing.T) {
	for _, s := range []sshTarget{
		{host: "-oProxyCommand=x", remoteBin: "zgolden"},
		{host: "h;rm -rf /", remoteBin: "zgolden"},
		{host: "h", remoteBin: "zgolden; reboot"},
		{host: "h", remoteBin: "zgolden", remoteSocket: "$(id)"},
		{host: "", remoteBin: "zgolden"},
	} {
		if err := s.check(); !errors.Is(err, driver.ErrInvalid) {
			t.Errorf("%+v: %v; want ErrInvalid", s, err)
		}
	}
	ok := sshTarget{host: "root@node-7.example", remoteBin: "/usr/local/bin/zgolden", remoteSocket: "/run/zgolden/admin.sock"}
	if err := ok.check(); err != nil {
		t.Errorf("%+v: %v", ok, err)
	}
}

// TestResumeToken: a push or pull resumes only the receiver's partial receive of the generation
// it is about to send, and never carries a token that is not one into a remote command line.
func TestResumeToken(t *testing.T) {
	const tok = "1-e604ea4bf-e0-789c63a2"
	gs := []driver.Golden{
		{Project: "other", Partial: &driver.PartialReceive{Project: "other", Generation: 3, Token: "1-aa-bb-cc"}},
		{Project: "prj", Partial: &driver.PartialReceive{Project: "prj", Generation: 3, Token: tok}},
	}
	for _, tc := range []struct {
		project string
		n       int
		want    string
	}{{"prj", 3, tok}, {"prj", 4, ""}, {"none", 3, ""}} {
		if got, err := resumeToken(gs, tc.project, tc.n); err != nil || got != tc.want {
			t.Errorf("resumeToken(%s, %d) = %q, %v; want %q", tc.project, tc.n, got, err, tc.want)
		}
	}
	for _, bad := range []string{"1-aa-bb-cc; reboot", "$(reboot)", "1-aa-bb", "-t 1-aa-bb-cc", "1-AA-bb-cc"} {
		gs := []driver.Golden{{Project: "prj", Partial: &driver.PartialReceive{Generation: 1, Token: bad}}}
		if _, err := resumeToken(gs, "prj", 1); !errors.Is(err, driver.ErrInvalid) {
			t.Errorf("token %q: %v; want it refused as invalid", bad, err)
		}
	}
}
