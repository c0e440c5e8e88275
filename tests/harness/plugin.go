package harness

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Plugin is a `zgolden serve` process registered with Docker as a legacy plugin.
//
// Docker never forgets a legacy plugin name it has seen: every later `docker volume rm` of an
// unknown name, and every `docker volume ls`, tries each known plugin (and every socket file in
// /run/docker/plugins) with retries for up to 30 s. So each test package uses one fixed name,
// tests in it run one plugin at a time, and the socket file is removed when a plugin stops.
type Plugin struct {
	Name        string // the --driver name Docker knows it by
	Socket      string
	AdminSocket string
	MountRoot   string
	args        []string
	extra       []string // added to args from the next Start on (Extra)
	wrap        []string // a command the plugin runs under, from the next Start on (Wrap)
	env         []string // added to the plugin's environment (StartPluginEnv)
	t           testing.TB

	mu   sync.Mutex
	cmd  *exec.Cmd
	logs *lockedBuffer
	done chan struct{}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Binary returns the zgolden binary under test ($ZGOLDEN_BIN, as make test-host and the guest
// set it), skipping the test when there is none.
func Binary(t testing.TB) string {
	t.Helper()
	bin := os.Getenv("ZGOLDEN_BIN")
	if bin == "" {
		bin = filepath.Join(repoRoot(), "bin/zgolden")
	}
	if _, err := os.Stat(bin); err != nil {
		t.Skipf("no zgolden binary at %s: run make build (or set ZGOLDEN_BIN)", bin)
	}
	return bin
}

// StartPlugin starts `zgolden serve` with args plus a private socket, state dir and mount root
// (unless args set them), waits until it answers, and stops it (SIGTERM) when the test ends.
func StartPlugin(t testing.TB, name string, args ...string) *Plugin {
	t.Helper()
	return StartPluginEnv(t, name, nil, args...)
}

// StartPluginEnv is StartPlugin with env (KEY=VALUE) added to the plugin's environment only, for
// settings such as the Docker client's TLS that the test's own docker commands must not get.
func StartPluginEnv(t testing.TB, name string, env []string, args ...string) *Plugin {
	t.Helper()
	RequireRoot(t)
	state := filepath.Join("/run/zgolden-test", name+"-"+ID())
	p := &Plugin{
		Name: name, Socket: "/run/docker/plugins/" + name + ".sock", AdminSocket: filepath.Join(state, "admin.sock"),
		MountRoot: filepath.Join(state, "mounts"), env: env, t: t,
		args: append([]string{"serve", "--socket", "/run/docker/plugins/" + name + ".sock", "--state-dir", state,
			"--mount-root", filepath.Join(state, "mounts"), "--log-level", "debug"}, args...),
	}
	p.Start()
	t.Cleanup(func() {
		p.Stop(syscall.SIGTERM)
		_ = os.Remove(p.Socket) // a killed plugin leaves it, and Docker stalls on dead sockets
		if t.Failed() {
			t.Logf("plugin %s log:\n%s", name, p.Logs())
		}
	})
	return p
}

// Wrap makes every later Start run the plugin under argv (for example unshare), or directly
// when argv is empty.
func (p *Plugin) Wrap(argv ...string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.wrap = argv
}

// Extra sets arguments that every later Start adds to the plugin's own (none, when empty), for
// tests that run a phase with another setting such as --spares.
func (p *Plugin) Extra(args ...string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.extra = args
}

// Start (re)starts the plugin process and waits for both sockets.
func (p *Plugin) Start() {
	p.t.Helper()
	p.mu.Lock()
	p.logs = &lockedBuffer{}
	argv := append(append(slices.Clone(p.wrap), Binary(p.t)), append(slices.Clone(p.args), p.extra...)...)
	p.cmd = exec.Command(argv[0], argv[1:]...)
	p.cmd.Stdout, p.cmd.Stderr = p.logs, p.logs
	p.cmd.Env = append(append(os.Environ(), "ZGOLDEN_ADMIN_SOCKET="+p.AdminSocket), p.env...)
	if err := p.cmd.Start(); err != nil {
		p.mu.Unlock()
		p.t.Fatal(err)
	}
	p.done = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) { _ = cmd.Wait(); close(done) }(p.cmd, p.done)
	done := p.done
	p.mu.Unlock()
	deadline := time.Now().Add(60 * time.Second)
	for {
		select {
		case <-done:
			p.t.Fatalf("zgolden serve exited at start-up:\n%s", p.Logs())
		default:
		}
		if dial(p.Socket) && dial(p.AdminSocket) {
			return
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("zgolden serve did not answer within 60s:\n%s", p.Logs())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func dial(path string) bool {
	c, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// Stop sends sig (SIGKILL to simulate a crash) and waits for the process to exit.
func (p *Plugin) Stop(sig syscall.Signal) {
	p.mu.Lock()
	cmd, done := p.cmd, p.done
	p.mu.Unlock()
	if cmd == nil || cmd.Process == nil {
		return
	}
	_ = cmd.Process.Signal(sig)
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		<-done
	}
}

// Pid is the running plugin process's, or 0.
func (p *Plugin) Pid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil || p.cmd.Process == nil {
		return 0
	}
	return p.cmd.Process.Pid
}

// Logs returns what the plugin printed since its last start.
func (p *Plugin) Logs() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.logs == nil {
		return ""
	}
	return p.logs.String()
}

// Admin runs the zgolden admin command line against this plugin.
func (p *Plugin) Admin(t testing.TB, args ...string) (string, error) {
	t.Helper()
	return Output(Binary(t), append(args, "--admin-socket", p.AdminSocket)...)
}
