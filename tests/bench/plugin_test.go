package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/zgolden/zgolden/tests/harness"
)

// plugin is a `zgolden serve` process the bench talks to over its Docker volume socket, exactly
// as dockerd does (POST /VolumeDriver.*), on a private socket that Docker does not discover.
type plugin struct {
	bin, socket, admin, mountRoot, logPath string
	args                                   []string
	cmd                                    *exec.Cmd
	done                                   chan struct{}
	hc                                     *http.Client
	t                                      testing.TB

	callsMu sync.Mutex
	calls   []clientCall // every volume call's send and reply, for splitting its time (probes_test.go)
}

// clientCall is one volume call as the bench saw it: when its request went out and when its
// reply was read.
type clientCall struct {
	call, volume  string // call as the plugin's log names it: create, mount, unmount, remove
	sent, replied time.Time
}

// volumeCall is call for the volume calls, recording their times.
func (p *plugin) volumeCall(method, name string, req, resp any) error {
	sent := time.Now()
	err := p.call(method, req, resp)
	p.callsMu.Lock()
	p.calls = append(p.calls, clientCall{call: strings.ToLower(method), volume: name, sent: sent, replied: time.Now()})
	p.callsMu.Unlock()
	return err
}

func startPlugin(t testing.TB, dir string, backendArgs ...string) *plugin {
	t.Helper()
	p := &plugin{
		bin:       harness.Binary(t),
		socket:    filepath.Join(dir, "plugin.sock"),
		admin:     filepath.Join(dir, "admin.sock"),
		mountRoot: filepath.Join(dir, "mounts"),
		logPath:   filepath.Join(dir, "plugin.log"),
		t:         t,
	}
	// The state directory (mount references, fsynced at every Mount) is on tmpfs under /run, as
	// the plugin's default is: on a disk, its fsyncs would be charged to the plugin.
	state := filepath.Join("/run", "zgolden-bench-"+harness.ID())
	t.Cleanup(func() { _ = os.RemoveAll(state) })
	// Debug: the plugin logs every request with its own time, which the load case reads.
	p.args = append([]string{"serve", "--socket", p.socket, "--admin-socket", p.admin, "--state-dir", state,
		"--mount-root", p.mountRoot, "--log-level", "debug"}, backendArgs...)
	// Warm spares (zfsstore/spares.go, reflinkstore/spares.go) only when asked: the other cases
	// time the Create that clones, which is what a burst beyond the spares gets.
	if n := os.Getenv("ZGOLDEN_BENCH_SPARES"); n != "" {
		p.args = append(p.args, "--spares", n, "--record-dir", filepath.Join(dir, "records"))
	} else {
		p.args = append(p.args, "--spares", "0")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	p.hc = &http.Client{
		Timeout: 5 * time.Minute,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, "unix", p.socket)
			},
			MaxIdleConnsPerHost: 64,
		},
	}
	if _, err := p.start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.stop(syscall.SIGTERM)
		if t.Failed() {
			if data, err := os.ReadFile(p.logPath); err == nil {
				t.Logf("plugin log (last 4 KiB):\n%s", tail(string(data), 4096))
			}
		}
	})
	return p
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// start execs the plugin and returns how long it took until the socket answered List with
// every volume (want, or any number when want < 0).
func (p *plugin) start() (time.Duration, error) { return p.startWant(-1) }

func (p *plugin) startWant(want int) (time.Duration, error) {
	logf, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return 0, err
	}
	_ = os.Remove(p.socket)
	p.cmd = exec.Command(p.bin, p.args...)
	// The plugin writes its log into a pipe that this process copies to the file, as it writes
	// to journald or to Docker's plugin log when deployed. Given the file itself, every log line
	// dirtied the page cache in the plugin's own thread, and under the load case's writers the
	// kernel throttles a thread that dirties pages (balance_dirty_pages): the plugin's calls
	// paid for the bench's log. A writer that is not an *os.File makes exec set up the pipe.
	w := struct{ io.Writer }{logf}
	p.cmd.Stdout, p.cmd.Stderr = w, w
	p.cmd.WaitDelay = 5 * time.Second // a child that kept the pipe does not hold Wait
	t0 := time.Now()
	if err := p.cmd.Start(); err != nil {
		logf.Close()
		return 0, err
	}
	p.done = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) { _ = cmd.Wait(); logf.Close(); close(done) }(p.cmd, p.done)
	deadline := t0.Add(5 * time.Minute)
	for {
		select {
		case <-p.done:
			data, _ := os.ReadFile(p.logPath)
			return 0, fmt.Errorf("zgolden serve exited at start-up:\n%s", tail(string(data), 4096))
		default:
		}
		if vols, err := p.list(); err == nil && (want < 0 || len(vols) == want) {
			if _, err := os.Stat(p.admin); err == nil {
				return time.Since(t0), nil
			}
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("zgolden serve did not answer within 5 minutes")
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func (p *plugin) stop(sig syscall.Signal) {
	if p.cmd == nil || p.cmd.Process == nil {
		return
	}
	_ = p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
	case <-time.After(60 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
	p.cmd = nil
	p.hc.CloseIdleConnections()
}

func (p *plugin) pid() int { return p.cmd.Process.Pid }

// call posts one Docker volume API request and decodes the reply; a reply with Err is an error.
func (p *plugin) call(method string, req, resp any) error {
	body, err := json.Marshal(req)
	if err != nil {
		return err
	}
	r, err := p.hc.Post("http://plugin/VolumeDriver."+method, "application/vnd.docker.plugins.v1.2+json", bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("VolumeDriver.%s: %w", method, err)
	}
	defer r.Body.Close()
	data, err := io.ReadAll(r.Body)
	if err != nil {
		return err
	}
	var e struct{ Err string }
	_ = json.Unmarshal(data, &e)
	if r.StatusCode != http.StatusOK || e.Err != "" {
		return fmt.Errorf("VolumeDriver.%s %s: HTTP %d: %s", method, body, r.StatusCode, strings.TrimSpace(string(data)))
	}
	if resp != nil {
		return json.Unmarshal(data, resp)
	}
	return nil
}

func (p *plugin) create(name string, opts map[string]string) error {
	return p.volumeCall("Create", name, map[string]any{"Name": name, "Opts": opts}, nil)
}

func (p *plugin) mount(name, id string) (string, error) {
	var r struct{ Mountpoint string }
	err := p.volumeCall("Mount", name, map[string]string{"Name": name, "ID": id}, &r)
	return r.Mountpoint, err
}

func (p *plugin) unmount(name, id string) error {
	return p.volumeCall("Unmount", name, map[string]string{"Name": name, "ID": id}, nil)
}

func (p *plugin) remove(name string) error {
	return p.volumeCall("Remove", name, map[string]string{"Name": name}, nil)
}

func (p *plugin) list() ([]string, error) {
	var r struct{ Volumes []struct{ Name string } }
	if err := p.call("List", struct{}{}, &r); err != nil {
		return nil, err
	}
	names := make([]string, len(r.Volumes))
	for i, v := range r.Volumes {
		names[i] = v.Name
	}
	return names, nil
}

// adminCLI runs the zgolden command line against this plugin.
func (p *plugin) adminCLI(args ...string) (string, error) {
	return harness.Output(p.bin, append(args, "--admin-socket", p.admin)...)
}

// importGolden seeds project from dir with `zgolden golden import` and returns the generation's
// source (the ZFS snapshot or the image file), and how long the import took.
func (p *plugin) importGolden(t testing.TB, dir, project, kind string) (string, time.Duration) {
	t.Helper()
	// Not harness.Output: its 10-minute bound is too short for a 1M-file golden.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Hour)
	defer cancel()
	t0 := time.Now()
	raw, err := exec.CommandContext(ctx, p.bin, "golden", "import", dir, "--project", project, "--type", kind, "--admin-socket", p.admin).CombinedOutput()
	took := time.Since(t0)
	out := string(raw)
	if err != nil {
		t.Fatalf("golden import %s: %v\n%s", dir, err, out)
	}
	if gens := p.generations(t, project); len(gens) > 0 {
		return gens[len(gens)-1].Source, took
	}
	t.Fatalf("golden ls shows no generation of %s", project)
	return "", 0
}

// generation is what the bench reads of a generation in golden ls --json.
type generation struct {
	Number int
	Source string
}

// generations lists project's generations on p, oldest first.
func (p *plugin) generations(t testing.TB, project string) []generation {
	t.Helper()
	out, err := p.adminCLI("golden", "ls", "--json")
	if err != nil {
		t.Fatalf("golden ls: %v\n%s", err, out)
	}
	var gs []struct {
		Project     string
		Generations []generation
	}
	if err := json.Unmarshal([]byte(out), &gs); err != nil {
		t.Fatalf("golden ls --json: %v\n%s", err, out)
	}
	for _, g := range gs {
		if g.Project == project {
			return g.Generations
		}
	}
	return nil
}

// rss returns the plugin's resident and peak resident memory in KiB.
func (p *plugin) rss() (rss, hwm int) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.pid()))
	if err != nil {
		return 0, 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		switch f[0] {
		case "VmRSS:":
			rss, _ = strconv.Atoi(f[1])
		case "VmHWM:":
			hwm, _ = strconv.Atoi(f[1])
		}
	}
	return rss, hwm
}
