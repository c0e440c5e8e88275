// Package fleet_test moves goldens between two zgolden servers over real SSH: the system ssh
// client against an sshd of the test's own on 127.0.0.1, with generated keys. It runs on the
// reflink store on the host, and on ZFS in the guest (two parents in its pool, as two hosts).
package fleet_test

import (
	"bytes"
	"crypto/rand"
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

// server is one zgolden serve, not registered with Docker: on ZFS in the guest (a parent of its
// own in ZGOLDEN_TEST_ZPOOL), on the reflink store on the host.
type server struct {
	name, dir, socket, admin string
	bin                      string
	args                     []string
	cmd                      *exec.Cmd
	logs                     *bytes.Buffer
	exited                   chan struct{}
}

// backend is the store the servers run on here.
func backend() string {
	if os.Getenv("ZGOLDEN_TEST_ZPOOL") != "" {
		return "zfs"
	}
	return "reflink"
}

func startServer(t *testing.T, bin, name string) *server {
	t.Helper()
	dir := filepath.Join(t.TempDir(), name)
	s := &server{name: name, dir: dir, bin: bin, socket: filepath.Join(dir, "plugin.sock"), admin: filepath.Join(dir, "admin.sock")}
	s.args = []string{"serve", "--default-size", "1G", "--socket", s.socket, "--admin-socket", s.admin,
		"--state-dir", filepath.Join(dir, "state"), "--mount-root", filepath.Join(dir, "mnt")}
	if backend() == "zfs" {
		s.args = append(s.args, "--backend", "zfs", "--parent", harness.ZFSParent(t))
	} else {
		s.args = append(s.args, "--backend", "reflink", "--root", filepath.Join(dir, "root"), "--store-size", "4G")
	}
	t.Cleanup(func() {
		s.stop()
		// serve leaves the store file mounted for its next start (reflinkstore.Close): the test
		// unmounts it, deepest mount first, before its directory goes.
		mounts, _ := xfsutil.MountsUnder(dir)
		for i := len(mounts) - 1; i >= 0; i-- {
			if out, err := harness.Output("umount", mounts[i].Mountpoint); err != nil {
				t.Errorf("cleanup: umount %s: %v\n%s", mounts[i].Mountpoint, err, out)
			}
		}
	})
	s.start(t)
	return s
}

// start runs zgolden serve with env added to the test's, and waits for its admin socket.
func (s *server) start(t *testing.T, env ...string) {
	t.Helper()
	cmd := exec.Command(s.bin, s.args...)
	cmd.Env = append(os.Environ(), env...)
	logs := new(bytes.Buffer)
	cmd.Stdout, cmd.Stderr = logs, logs
	_ = os.Remove(s.admin) // a killed server's; the new one must be the one that answers
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s.cmd, s.logs, s.exited = cmd, logs, make(chan struct{})
	go func() { _ = cmd.Wait(); close(s.exited) }()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("zgolden serve %s (%v):\n%s", s.name, env, logs.String())
		}
	})
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(50 * time.Millisecond) {
		if c, err := net.Dial("unix", s.admin); err == nil {
			c.Close()
			return
		}
		select {
		case <-s.exited:
			t.Fatalf("zgolden serve %s exited at start:\n%s", s.name, logs.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("zgolden serve %s did not start:\n%s", s.name, logs.String())
		}
	}
}

// stop interrupts the server and waits for it.
func (s *server) stop() {
	select {
	case <-s.exited:
	default:
		_ = s.cmd.Process.Signal(os.Interrupt)
		<-s.exited
	}
}

// died waits for a server armed with a fault point to have killed itself.
func (s *server) died(t *testing.T) {
	t.Helper()
	select {
	case <-s.exited:
		if !strings.Contains(s.logs.String(), "fault injection: SIGKILL") {
			t.Fatalf("zgolden serve %s exited, but not at its fault point:\n%s", s.name, s.logs.String())
		}
	case <-time.After(time.Minute):
		t.Fatalf("zgolden serve %s did not die at its fault point", s.name)
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

// verbs returns a runner of zgolden commands against a server, and one of push or pull from
// local to remote over this sshd.
func (d *sshd) verbs(bin string) (func(s *server, args ...string) (string, error), func(verb string, local, remote *server, project string, extra ...string) (moved, string, error)) {
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
	return zg, transfer
}

// fleet is two servers, a and b, an sshd between them, and golden prj imported into a.
type fleet struct {
	bin, tree string
	a, b      *server
	d         *sshd
	zg        func(s *server, args ...string) (string, error)
	transfer  func(verb string, local, remote *server, project string, extra ...string) (moved, string, error)
}

func twoHosts(t *testing.T) *fleet {
	t.Helper()
	harness.RequireRoot(t)
	f := &fleet{bin: harness.Binary(t), d: startSSHD(t), tree: t.TempDir()}
	f.a, f.b = startServer(t, f.bin, "a"), startServer(t, f.bin, "b")
	f.zg, f.transfer = f.d.verbs(f.bin)
	drivertest.MakeTree(t, f.tree)
	if out, err := f.zg(f.a, "golden", "import", f.tree, "--project", "prj"); err != nil {
		t.Fatalf("import: %v\n%s", err, out)
	}
	return f
}

type moved struct {
	Project    string
	Generation int
	Base       int
	Bytes      int64
	UpToDate   bool `json:"up_to_date"`
	Resumed    bool
}

// TestPushPullOverSSH: push a golden to another host, again (nothing to do), after a promotion,
// pull one back; refuse an unknown host key, an unreachable host and a diverged receiver with
// errors that say so.
func TestPushPullOverSSH(t *testing.T) {
	f := twoHosts(t)
	tree, a, b, d, zg, transfer := f.tree, f.a, f.b, f.d, f.zg, f.transfer

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

// TestTransferSurvivesAKill: kill -9 of the receiving server, then of the sending one, in the
// middle of a push, and of the receiver in the middle of a pull; each time the same command
// run again completes the transfer. On ZFS it resumes: the receiver kept what arrived, and only
// the rest crosses. On the reflink store the whole generation is sent again. Either way nothing
// of the broken transfer is left, and the golden clones whole.
func TestTransferSurvivesAKill(t *testing.T) {
	f := twoHosts(t)
	bin, a, b, zg, transfer := f.bin, f.a, f.b, f.zg, f.transfer
	// streamSize is the size of the stream of project's newest generation on s (since base).
	streamSize := func(s *server, base int) int64 {
		t.Helper()
		f, err := os.Create(filepath.Join(t.TempDir(), "stream"))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		cmd := exec.Command(bin, "golden", "export", "prj", "--since", strconv.Itoa(base), "--admin-socket", s.admin)
		var stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = f, &stderr
		if err := cmd.Run(); err != nil {
			t.Fatalf("golden export: %v\n%s", err, stderr.String())
		}
		st, err := f.Stat()
		if err != nil {
			t.Fatal(err)
		}
		return st.Size()
	}
	// baseFor is the generation a push of generation n sends from: on ZFS the one before it when
	// the sender still holds it (a promotion may have reclaimed it), on the reflink store none.
	baseFor := func(n int) int {
		t.Helper()
		var gs []driver.Golden
		out, err := zg(a, "golden", "ls", "--json")
		if err != nil || json.Unmarshal([]byte(out), &gs) != nil {
			t.Fatalf("golden ls on a: %v\n%s", err, out)
		}
		for _, g := range gs {
			for _, gen := range g.Generations {
				if g.Project == "prj" && gen.Number == n-1 && backend() == "zfs" {
					return n - 1
				}
			}
		}
		return 0
	}
	partial := func(s *server) *driver.PartialReceive {
		t.Helper()
		var gs []driver.Golden
		out, err := zg(s, "golden", "ls", "--json")
		if err != nil || json.Unmarshal([]byte(out), &gs) != nil {
			t.Fatalf("golden ls on %s: %v\n%s", s.name, err, out)
		}
		for _, g := range gs {
			if g.Project == "prj" {
				return g.Partial
			}
		}
		return nil
	}
	// killed runs verb with victim armed to die at point mid-stream, restarts it, and runs the
	// verb again: the second run must complete generation n, resumed on ZFS.
	killed := func(what, verb string, local, remote, victim *server, point string, n int, whole int64) {
		t.Helper()
		victim.stop()
		victim.start(t, "ZGOLDEN_FAULT="+point)
		if m, out, err := transfer(verb, local, remote, "prj"); err == nil {
			t.Fatalf("%s: the %s went through although %s was killed mid-stream: %+v\n%s", what, verb, victim.name, m, out)
		}
		victim.died(t)
		// The killed server's zfs receive (or the live receiver's, when the sender died)
		// outlives the kill: it reads the stream's end from the closed pipe, and ZFS saves what
		// arrived in a transaction group after that. Until it ends there is no partial receive
		// to see or resume, and on a slow guest that took longer than the restart.
		zfsReceivesGone(t)
		victim.start(t)
		receiver := b
		if verb == "pull" {
			receiver = local
		}
		p := partial(receiver)
		switch {
		case backend() == "zfs" && (p == nil || p.Generation != n):
			t.Fatalf("%s: after the kill and a restart the receiver keeps %+v; want a partial receive of generation %d", what, p, n)
		case backend() != "zfs" && p != nil:
			t.Fatalf("%s: the reflink store keeps a partial receive %+v", what, p)
		}
		m, out, err := transfer(verb, local, remote, "prj")
		if err != nil || m.Generation != n {
			t.Fatalf("%s: the %s again: %+v, %v\n%s", what, verb, m, err, out)
		}
		if backend() == "zfs" && (!m.Resumed || m.Bytes >= whole) {
			t.Errorf("%s: the %s again moved %d bytes, resumed=%v; want the rest of the %d-byte stream, resumed", what, verb, m.Bytes, m.Resumed, whole)
		}
		t.Logf("%s: the second %s moved %d bytes of a %d-byte stream (resumed: %v)", what, verb, m.Bytes, whole, m.Resumed)
		if p := partial(receiver); p != nil {
			t.Errorf("%s: a partial receive is left after the transfer: %+v", what, p)
		}
	}

	killed("the receiver killed during a push", "push", a, b, b, "receive:mid-stream", 1, streamSize(a, 0))
	b.checkClone(t, "prj", "b1")

	a.call(t, "Create", map[string]any{"Name": "a1", "Opts": map[string]string{"golden": "prj"}}, nil)
	if out, err := zg(a, "golden", "promote", "a1", "--project", "prj"); err != nil {
		t.Fatalf("promote: %v\n%s", err, out)
	}
	killed("the sender killed during a push", "push", a, b, a, "export:mid-stream", 2, streamSize(a, baseFor(2)))
	b.checkClone(t, "prj", "b2")

	// A session's change of 1 MiB: without it generation 3's incremental stream is a few hundred
	// bytes, and ends before the fault point.
	a.call(t, "Create", map[string]any{"Name": "a2", "Opts": map[string]string{"golden": "prj"}}, nil)
	var m struct{ Mountpoint string }
	a.call(t, "Mount", map[string]string{"Name": "a2", "ID": "change"}, &m)
	change := make([]byte, 1<<20)
	if _, err := rand.Read(change); err != nil { // random: compression leaves it 1 MiB
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(m.Mountpoint, "change.bin"), change, 0o644); err != nil {
		t.Fatal(err)
	}
	a.call(t, "Unmount", map[string]string{"Name": "a2", "ID": "change"}, nil)
	if out, err := zg(a, "golden", "promote", "a2", "--project", "prj"); err != nil {
		t.Fatalf("promote: %v\n%s", err, out)
	}
	killed("the receiver killed during a pull", "pull", b, a, b, "receive:mid-stream", 3, streamSize(a, baseFor(3)))
	b.checkClone(t, "prj", "b3")
	for _, v := range []string{"a1", "a2"} {
		a.call(t, "Remove", map[string]string{"Name": v}, nil)
	}
}

// zfsReceivesGone waits, up to two minutes, until no `zfs receive` process is left on this
// machine (the tests here run one at a time).
func zfsReceivesGone(t *testing.T) {
	t.Helper()
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(100 * time.Millisecond) {
		var left []string
		procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
		for _, p := range procs {
			argv, err := os.ReadFile(p)
			if f := strings.Split(string(argv), "\x00"); err == nil && len(f) > 1 && filepath.Base(f[0]) == "zfs" && f[1] == "receive" {
				left = append(left, strings.Join(f, " "))
			}
		}
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("zfs receive still running two minutes after the kill: %v", left)
		}
	}
}
