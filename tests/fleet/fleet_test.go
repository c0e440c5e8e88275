// Package fleet_test moves goldens between two zgolden servers over real SSH: the system ssh
// client against an sshd of the test's own on 127.0.0.1, with generated keys, on the reflink
// store of this host (the ZFS store's streams are tested in the guest, zfsstore/transfer_test.go).
package fleet_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/driver/drivertest"
	"github.com/zgolden/zgolden/tests/harness"
	"github.com/zgolden/zgolden/xfsutil"
)

// server is one zgolden serve on the reflink store, not registered with Docker.
type server struct {
	dir, socket, admin string
}

func startServer(t *testing.T, bin, name string) *server {
	t.Helper()
	dir := filepath.Join(t.TempDir(), name)
	s := &server{dir: dir, socket: filepath.Join(dir, "plugin.sock"), admin: filepath.Join(dir, "admin.sock")}
	cmd := exec.Command(bin, "serve", "--backend", "reflink", "--root", filepath.Join(dir, "root"), "--store-size", "4G",
		"--default-size", "1G", "--socket", s.socket, "--admin-socket", s.admin,
		"--state-dir", filepath.Join(dir, "state"), "--mount-root", filepath.Join(dir, "mnt"))
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("zgolden serve %s:\n%s", name, logs.String())
		}
		// serve leaves the store file mounted for its next start (reflinkstore.Close): the test
		// unmounts it, deepest mount first, before its directory goes.
		mounts, _ := xfsutil.MountsUnder(dir)
		for i := len(mounts) - 1; i >= 0; i-- {
			if out, err := harness.Output("umount", mounts[i].Mountpoint); err != nil {
				t.Errorf("cleanup: umount %s: %v\n%s", mounts[i].Mountpoint, err, out)
			}
		}
	})
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(50 * time.Millisecond) {
		if c, err := net.Dial("unix", s.admin); err == nil {
			c.Close()
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("zgolden serve %s did not start:\n%s", name, logs.String())
		}
	}
}

// call is one Docker volume API call to the server's plugin socket.
func (s *server) call(t *testing.T, method string, body, out any) {
	t.Helper()
	c := &http.Client{Transport: &http.Transport{Dial: func(_, _ string) (net.Conn, error) { return net.Dial("unix", s.socket) }}}
	b, _ := json.Marshal(body)
	resp, err := c.Post("http://plugin/VolumeDriver."+method, "application/json", bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var reply struct{ Err string }
	raw := new(bytes.Buffer)
	_, _ = raw.ReadFrom(resp.Body)
	_ = json.Unmarshal(raw.Bytes(), &reply)
	if reply.Err != "" {
		t.Fatalf("VolumeDriver.%s: %s", method, reply.Err)
	}
	if out != nil {
		if err := json.Unmarshal(raw.Bytes(), out); err != nil {
			t.Fatal(err)
		}
	}
}

// checkClone clones project's newest generation on the server and checks the tree in it.
func (s *server) checkClone(t *testing.T, project, vol string) {
	t.Helper()
	s.call(t, "Create", map[string]any{"Name": vol, "Opts": map[string]string{"golden": project}}, nil)
	var m struct{ Mountpoint string }
	s.call(t, "Mount", map[string]string{"Name": vol, "ID": "check"}, &m)
	drivertest.CheckTree(t, m.Mountpoint)
	s.call(t, "Unmount", map[string]string{"Name": vol, "ID": "check"}, nil)
	s.call(t, "Remove", map[string]string{"Name": vol}, nil)
}

// sshd is an sshd of the test's own, on a free port of 127.0.0.1, that lets in one key.
type sshd struct {
	port            int
	key, knownHosts string
	otherKnownHosts string // holds another key for the same host
}

func startSSHD(t *testing.T) *sshd {
	t.Helper()
	harness.RequireTools(t, "ssh", "ssh-keygen", "/usr/sbin/sshd")
	dir := t.TempDir()
	for _, k := range []string{"host", "client", "impostor"} {
		harness.Run(t, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", k, "-f", filepath.Join(dir, k))
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	read := func(name string) string {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(b))
	}
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	hostPattern := fmt.Sprintf("[127.0.0.1]:%d", port)
	s := &sshd{
		port: port, key: filepath.Join(dir, "client"),
		knownHosts:      write("known_hosts", hostPattern+" "+read("host.pub")),
		otherKnownHosts: write("known_hosts_other", hostPattern+" "+read("impostor.pub")),
	}
	auth := write("authorized_keys", read("client.pub"))
	if err := os.MkdirAll("/run/sshd", 0o755); err != nil { // sshd's privilege separation directory
		t.Fatal(err)
	}
	cmd := exec.Command("/usr/sbin/sshd", "-D", "-e", "-f", "/dev/null", "-p", strconv.Itoa(port), "-h", filepath.Join(dir, "host"),
		"-o", "ListenAddress=127.0.0.1", "-o", "AuthorizedKeysFile="+auth, "-o", "StrictModes=no",
		"-o", "PermitRootLogin=prohibit-password", "-o", "PasswordAuthentication=no",
		"-o", "KbdInteractiveAuthentication=no", "-o", "PidFile="+filepath.Join(dir, "sshd.pid"))
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("sshd:\n%s", logs.String())
		}
	})
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port)); err == nil {
			c.Close()
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("sshd did not listen:\n%s", logs.String())
		}
	}
}

type moved struct {
	Project    string
	Generation int
	Base       int
	Bytes      int64
	UpToDate   bool `json:"up_to_date"`
}

// TestPushPullOverSSH: push a golden to another host, again (nothing to do), after a promotion,
// pull one back; refuse an unknown host key, an unreachable host and a diverged receiver with
// errors that say so.
func TestPushPullOverSSH(t *testing.T) {
	harness.RequireRoot(t)
	bin := harness.Binary(t)
	d := startSSHD(t)
	a, b := startServer(t, bin, "a"), startServer(t, bin, "b")
	zg := func(s *server, args ...string) (string, error) {
		return harness.Output(bin, append(args, "--admin-socket", s.admin)...)
	}
	transfer := func(verb string, local, remote *server, project string, extra ...string) (moved, string, error) {
		args := append([]string{"golden", verb, project, "root@127.0.0.1", "--ssh-port", strconv.Itoa(d.port),
			"--identity", d.key, "--known-hosts", d.knownHosts, "--remote-zgolden", bin,
			"--remote-admin-socket", remote.admin, "--json"}, extra...)
		out, err := zg(local, args...)
		var m moved
		if err == nil {
			err = json.Unmarshal([]byte(out[strings.Index(out, "{"):]), &m)
		}
		return m, out, err
	}
	tree := t.TempDir()
	drivertest.MakeTree(t, tree)
	if out, err := zg(a, "golden", "import", tree, "--project", "prj"); err != nil {
		t.Fatalf("import: %v\n%s", err, out)
	}

	m, out, err := transfer("push", a, b, "prj")
	if err != nil || m.Generation != 1 || m.Base != 0 || m.Bytes == 0 || m.UpToDate {
		t.Fatalf("push: %+v, %v\n%s", m, err, out)
	}
	t.Logf("pushed generation 1: %d bytes", m.Bytes)
	b.checkClone(t, "prj", "b1")
	if m, out, err := transfer("push", a, b, "prj"); err != nil || !m.UpToDate {
		t.Errorf("a second push: %+v, %v\n%s; want up to date", m, err, out)
	}

	// A promotion on a: the next push sends generation 2 (in full on the reflink store).
	a.call(t, "Create", map[string]any{"Name": "a1", "Opts": map[string]string{"golden": "prj"}}, nil)
	if out, err := zg(a, "golden", "promote", "a1", "--project", "prj"); err != nil {
		t.Fatalf("promote: %v\n%s", err, out)
	}
	if m, out, err := transfer("push", a, b, "prj"); err != nil || m.Generation != 2 {
		t.Fatalf("push after a promotion: %+v, %v\n%s", m, err, out)
	}
	b.checkClone(t, "prj", "b2")

	// Pull: a project only b has comes to a.
	if out, err := zg(b, "golden", "import", tree, "--project", "only_b"); err != nil {
		t.Fatalf("import on b: %v\n%s", err, out)
	}
	if m, out, err := transfer("pull", a, b, "only_b"); err != nil || m.Generation != 1 {
		t.Fatalf("pull: %+v, %v\n%s", m, err, out)
	}
	a.checkClone(t, "only_b", "a2")
	if m, out, err := transfer("pull", a, b, "only_b"); err != nil || !m.UpToDate {
		t.Errorf("a second pull: %+v, %v\n%s; want up to date", m, err, out)
	}

	refused := func(what string, says []string, verb string, extra ...string) {
		t.Helper()
		_, out, err := transfer(verb, a, b, "prj", extra...)
		if err == nil {
			t.Errorf("%s: succeeded\n%s", what, out)
			return
		}
		for _, s := range says {
			if !strings.Contains(out, s) {
				t.Errorf("%s: the error does not say %q:\n%s", what, s, out)
			}
		}
		t.Logf("%s: %s", what, strings.TrimSpace(out))
	}
	refused("an unknown host key", []string{"Host key verification failed", "known_hosts"}, "push", "--known-hosts", d.otherKnownHosts)
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	closed := l.Addr().(*net.TCPAddr).Port
	l.Close()
	refused("an unreachable host", []string{"Connection refused", "ssh to root@127.0.0.1 failed"}, "push", "--ssh-port", strconv.Itoa(closed))
	refused("a remote word with shell characters", []string{"--remote-admin-socket", "letters, digits"}, "push", "--remote-admin-socket", "$(reboot)")

	// Each host promotes a generation 3 of its own: the histories diverge.
	b.call(t, "Create", map[string]any{"Name": "bown", "Opts": map[string]string{"golden": "prj"}}, nil)
	if out, err := zg(b, "golden", "promote", "bown", "--project", "prj"); err != nil {
		t.Fatalf("promote on b: %v\n%s", err, out)
	}
	a.call(t, "Create", map[string]any{"Name": "aown", "Opts": map[string]string{"golden": "prj"}}, nil)
	if out, err := zg(a, "golden", "promote", "aown", "--project", "prj"); err != nil {
		t.Fatalf("promote on a: %v\n%s", err, out)
	}
	refused("a diverged receiver", []string{"diverged", "zgolden on root@127.0.0.1"}, "push")

	var gs []driver.Golden
	out, err = zg(b, "golden", "ls", "--json")
	if err != nil || json.Unmarshal([]byte(out), &gs) != nil {
		t.Fatalf("golden ls on b: %v\n%s", err, out)
	}
	for _, g := range gs { // its newest is still its own (the promotion reclaimed the oldest)
		if n := g.Newest(); g.Project == "prj" && (n == nil || n.Number != 3 || n.FromVolume != "bown") {
			t.Errorf("b's golden changed under the refused push: %+v", g.Generations)
		}
	}
	for _, s := range []struct {
		srv  *server
		vols []string
	}{{a, []string{"a1", "aown"}}, {b, []string{"bown"}}} {
		for _, v := range s.vols {
			s.srv.call(t, "Remove", map[string]string{"Name": v}, nil)
		}
	}
}
