package plugin

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/zgolden/zgolden/driver/drivertest"
	"github.com/zgolden/zgolden/tests/harness"
)

// pluginName is the one managed plugin name this package gives Docker (as name:latest, so that
// --driver pluginName finds it). Docker remembers the driver of every volume; a name whose plugin
// is gone makes later volume commands wait for it, so tests remove their volumes before the
// plugin, and each test installs and removes the plugin itself.
const pluginName = "zgolden-plugintest"

// The package's shared fixtures, made on first use and torn down by TestMain.
var fix struct {
	mu       sync.Mutex
	tmp      string // package temporary directory
	rootfs   string // plugin rootfs without zgolden (cached build, or unpacked from a tarball)
	rootErr  string
	registry *registry
	regErr   string
}

func TestMain(m *testing.M) {
	code := m.Run()
	fix.mu.Lock()
	if fix.registry != nil {
		fix.registry.stop()
	}
	if fix.tmp != "" {
		os.RemoveAll(fix.tmp)
	}
	fix.mu.Unlock()
	os.Exit(code)
}

// repo is the repository root (tests run in their package directory).
func repo(t testing.TB) string {
	t.Helper()
	dir, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "go.mod")); err != nil {
		t.Fatalf("not in the repository's tests/plugin directory: %v", err)
	}
	return dir
}

// pkgTemp is a directory that lives until every test of the package has run.
func pkgTemp(t testing.TB) string {
	t.Helper()
	fix.mu.Lock()
	defer fix.mu.Unlock()
	if fix.tmp == "" {
		d, err := os.MkdirTemp("", "zgolden-plugintest-")
		if err != nil {
			t.Fatal(err)
		}
		fix.tmp = d
	}
	return fix.tmp
}

// pluginRootfs returns the plugin's root filesystem without zgolden: unpacked from
// $ZGOLDEN_PLUGIN_ROOTFS_TAR when set (the qemu guest cannot debootstrap), else the cached build
// of rootfs/build.sh (about a minute the first time, then instant).
func pluginRootfs(t testing.TB) string {
	t.Helper()
	harness.RequireRoot(t)
	tmp := pkgTemp(t)
	fix.mu.Lock()
	defer fix.mu.Unlock()
	if fix.rootfs == "" && fix.rootErr == "" {
		fix.rootErr = "building it failed earlier (see the first test that needed it)"
		if tarball := os.Getenv("ZGOLDEN_PLUGIN_ROOTFS_TAR"); tarball != "" {
			root := filepath.Join(tmp, "rootfs")
			if err := os.Mkdir(root, 0o755); err != nil {
				t.Fatal(err)
			}
			if out, err := harness.Output("tar", "--numeric-owner", "-xpf", tarball, "-C", root); err != nil {
				t.Fatalf("unpack %s: %v\n%s", tarball, err, out)
			}
			fix.rootfs = root
		} else if harness.InGuest() {
			fix.rootErr = ""
			t.Skip("ZGOLDEN_PLUGIN_ROOTFS_TAR is not set: the guest cannot build the plugin rootfs (no network); make test-vm passes it in")
		} else {
			harness.RequireTools(t, "debootstrap")
			cmd := exec.Command("bash", filepath.Join(repo(t), "rootfs/build.sh"))
			var stderr strings.Builder
			cmd.Stderr = &stderr
			out, err := cmd.Output()
			for _, l := range strings.Split(string(out), "\n") {
				if v, ok := strings.CutPrefix(l, "rootfs="); ok {
					fix.rootfs = v
				}
			}
			if err != nil || fix.rootfs == "" {
				fix.rootfs = ""
				t.Fatalf("rootfs/build.sh: %v\n%s", err, stderr.String())
			}
		}
		fix.rootErr = ""
	}
	if fix.rootErr != "" {
		t.Fatalf("plugin rootfs: %s", fix.rootErr)
	}
	return fix.rootfs
}

// buildPlugin assembles a plugin directory with packaging/build-plugin.sh (as `make plugin` does)
// from the rootfs and the zgolden binary bin, and returns it. With create, the script also runs
// `docker plugin create create DIR`.
func buildPlugin(t testing.TB, bin, create string) string {
	t.Helper()
	out := filepath.Join(pkgTemp(t), "plugin-"+harness.ID())
	args := []string{filepath.Join(repo(t), "packaging/build-plugin.sh"), "--rootfs", pluginRootfs(t), "--bin", bin, "--out", out}
	if create != "" {
		args = append(args, "--create", create)
	}
	start := time.Now()
	harness.Run(t, "bash", args...)
	t.Logf("packaging/build-plugin.sh --create %q: %s", create, time.Since(start).Round(time.Second))
	t.Cleanup(func() { os.RemoveAll(out) })
	return out
}

// dataDir makes the directory the plugin's "data" mount binds to /var/lib/zgolden (its host
// side is /var/lib/zgolden by default), as a shared mount point: the reflink store mounts its
// store file under it inside the plugin, and only a shared mount carries that mount back to the
// host, where the next plugin instance finds it (systemd hosts share / by default; this one
// does not). Everything mounted below it is unmounted when the test ends, after the plugin is
// gone (this cleanup is registered before the plugin's).
func dataDir(t testing.TB) string {
	t.Helper()
	d, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	harness.Run(t, "mount", "--bind", d, d)
	t.Cleanup(func() {
		if out, err := harness.Output("umount", "--recursive", d); err != nil {
			t.Errorf("cleanup: umount -R %s: %v\n%s", d, err, out)
		}
	})
	harness.Run(t, "mount", "--make-rshared", d)
	return d
}

// managed is one managed plugin in the test's Docker engine.
type managed struct {
	name string // as Docker lists it: pluginName:latest
	data string // host side of the plugin's /var/lib/zgolden
	id   string // volume names carry it: Docker remembers volume names per driver

	mu   sync.Mutex
	vols map[string]bool // volumes that may exist, removed at the end
}

// newManaged prepares the test's plugin: it removes a plugin of the same name left by an
// interrupted run, and registers the removal of the plugin (and of its volumes, see volume)
// before anything installs it.
func newManaged(t *testing.T) *managed {
	t.Helper()
	harness.Docker(t)
	m := &managed{name: pluginName + ":latest", id: harness.ID()}
	if _, err := harness.Output("docker", "plugin", "inspect", m.name); err == nil {
		t.Logf("removing plugin %s left by an earlier run", m.name)
		_, _ = harness.Output("docker", "plugin", "rm", "--force", m.name)
	}
	m.data = dataDir(t)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("plugin %s log (from dockerd's log):\n%s", m.name, m.logs())
		}
		if _, err := harness.Output("docker", "plugin", "inspect", m.name); err != nil {
			return
		}
		if out, err := harness.Output("docker", "plugin", "rm", "--force", m.name); err != nil {
			t.Errorf("cleanup: docker plugin rm %s: %v\n%s", m.name, err, out)
		}
	})
	return m
}

// enable applies settings (data.source and KEY=VALUE) and enables the plugin.
func (m *managed) enable(t *testing.T, settings ...string) {
	t.Helper()
	harness.DockerCmd(t, append([]string{"plugin", "set", m.name, "data.source=" + m.data}, settings...)...)
	if out, err := harness.Output("docker", "plugin", "enable", m.name); err != nil {
		t.Fatalf("docker plugin enable %s: %v\n%s\nplugin log:\n%s", m.name, err, out, m.logs())
	}
}

// pluginID returns Docker's id of the plugin.
func (m *managed) pluginID(t *testing.T) string {
	t.Helper()
	return harness.DockerCmd(t, "plugin", "inspect", "--format", "{{.Id}}", m.name)
}

// logs returns the plugin's output, which dockerd writes into its own log with plugin=<id>.
func (m *managed) logs() string {
	id, err := harness.Output("docker", "plugin", "inspect", "--format", "{{.Id}}", m.name)
	if err != nil {
		return "(plugin gone)"
	}
	id = strings.TrimSpace(id)
	// The host's engine logs to docker-engine.sh's file, the guest's to its results; the guest's
	// root also holds a stale copy of the former from its build, so read both.
	var lines []string
	for _, path := range []string{"/var/log/zgolden-dockerd.log", "/payload/results/dockerd.log"} {
		f, err := os.Open(path)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			if strings.Contains(sc.Text(), id) {
				lines = append(lines, sc.Text())
			}
		}
		f.Close()
	}
	if len(lines) > 60 {
		lines = lines[len(lines)-60:]
	}
	if len(lines) == 0 {
		return "(no lines for plugin " + id + " in dockerd's log)"
	}
	return strings.Join(lines, "\n")
}

// admin runs the zgolden command line against the plugin's admin socket, which the plugin makes
// in its state directory, /var/lib/zgolden/state: on the host, under the data directory.
func (m *managed) admin(t *testing.T, args ...string) string {
	t.Helper()
	args = append(args, "--admin-socket", filepath.Join(m.data, "state", "admin.sock"))
	out, err := harness.Output(harness.Binary(t), args...)
	if err != nil {
		t.Fatalf("zgolden %s: %v\n%s\nplugin log:\n%s", strings.Join(args, " "), err, out, m.logs())
	}
	return out
}

// metrics scrapes the plugin's Prometheus metrics from the unix socket config.json puts under its
// state directory (the plugin's network is none), on the host side of the data mount.
func (m *managed) metrics(t *testing.T) string {
	t.Helper()
	sock := filepath.Join(m.data, "state", "metrics.sock")
	c := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		},
	}}
	resp, err := c.Get("http://zgolden/metrics")
	if err != nil {
		t.Fatalf("scrape the managed plugin's metrics at %s: %v\nplugin log:\n%s", sock, err, m.logs())
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics on %s: %s, %v", sock, resp.Status, err)
	}
	return string(body)
}

// seedGolden imports a test tree as project's golden, the way the README tells managed-plugin
// users to: the tree goes under the data directory's import/, which the plugin sees at
// /var/lib/zgolden/import/.
func (m *managed) seedGolden(t *testing.T, project string) {
	t.Helper()
	src := filepath.Join(m.data, "import", project)
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	drivertest.MakeTree(t, src)
	m.admin(t, "golden", "import", "/var/lib/zgolden/import/"+project, "--project", project)
}

// volume creates a volume through docker and returns its unique name. Unless the test removed
// it (rmVolume), it is removed when the test ends, before the plugin (whose cleanup was
// registered earlier). Only volumes that may exist are removed: Docker looks an unknown volume
// name up in every plugin it ever knew, with retries, which takes a minute on a busy test host.
func (m *managed) volume(t *testing.T, name string, opts ...string) string {
	t.Helper()
	name = "zgp" + m.id + "-" + name
	m.live(t, name)
	args := []string{"volume", "create", "--driver", m.name}
	for _, o := range opts {
		args = append(args, "--opt", o)
	}
	args = append(args, name)
	if out, err := harness.Output("docker", args...); err != nil {
		if strings.Contains(out, "VolumeDriver.Create") {
			m.forget(name) // zgolden answered with an error: it made nothing
		}
		t.Fatalf("docker %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return name
}

// live registers a volume that may exist (for compose-made ones too) for removal at the end.
func (m *managed) live(t *testing.T, name string) {
	t.Helper()
	m.mu.Lock()
	if m.vols == nil {
		m.vols = map[string]bool{}
	}
	m.vols[name] = true
	m.mu.Unlock()
	t.Cleanup(func() {
		m.mu.Lock()
		exists := m.vols[name]
		m.mu.Unlock()
		if !exists {
			return
		}
		if out, err := harness.Output("docker", "volume", "rm", "--force", name); err != nil {
			t.Errorf("cleanup: docker volume rm %s: %v\n%s", name, err, out)
		}
	})
}

func (m *managed) forget(name string) {
	m.mu.Lock()
	delete(m.vols, name)
	m.mu.Unlock()
}

// rmVolume removes a volume through docker.
func (m *managed) rmVolume(t *testing.T, name string) {
	t.Helper()
	harness.DockerCmd(t, "volume", "rm", name)
	m.forget(name)
}

// run runs a throwaway busybox container with vol at /data and returns what it printed.
func (m *managed) run(t *testing.T, vol string, cmd ...string) string {
	t.Helper()
	args := append([]string{"run", "--rm", "--network", "none", "-v", vol + ":/data", harness.BusyboxImage()}, cmd...)
	out, err := harness.Output("docker", args...)
	if err != nil {
		t.Fatalf("docker %s: %v\n%s\nplugin log:\n%s", strings.Join(args, " "), err, out, m.logs())
	}
	return strings.TrimSpace(out)
}

// volumeStatus returns `docker volume inspect`'s Status of vol.
func volumeStatus(t *testing.T, vol string) map[string]any {
	t.Helper()
	var out []struct{ Status map[string]any }
	if err := json.Unmarshal([]byte(harness.DockerCmd(t, "volume", "inspect", vol)), &out); err != nil || len(out) != 1 {
		t.Fatalf("docker volume inspect %s: %v", vol, err)
	}
	return out[0].Status
}

// registry is Debian's docker-registry, run on a loopback port with its storage in a temporary
// directory: a real registry for docker plugin push, install and upgrade, and never a service.
type registry struct {
	addr string // 127.0.0.1:PORT
	cmd  *exec.Cmd
	done chan struct{}
	log  *os.File
}

// theRegistry starts the package's registry on first use; TestMain stops it.
func theRegistry(t *testing.T) *registry {
	t.Helper()
	harness.RequireRoot(t)
	harness.RequireTools(t, "docker-registry")
	tmp := pkgTemp(t)
	fix.mu.Lock()
	defer fix.mu.Unlock()
	if fix.registry == nil && fix.regErr == "" {
		r, err := startRegistry(filepath.Join(tmp, "registry"))
		if err != nil {
			fix.regErr = err.Error()
		}
		fix.registry = r
	}
	if fix.regErr != "" {
		t.Fatalf("local registry: %s", fix.regErr)
	}
	return fix.registry
}

func startRegistry(dir string) (*registry, error) {
	if err := os.MkdirAll(filepath.Join(dir, "data"), 0o700); err != nil {
		return nil, err
	}
	// A free loopback port: Docker treats 127.0.0.0/8 registries as insecure (plain HTTP) by
	// default, so no certificate is needed.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	addr := l.Addr().String()
	l.Close()
	cfg := fmt.Sprintf("version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\n  delete:\n    enabled: true\nhttp:\n  addr: %s\n", filepath.Join(dir, "data"), addr)
	cfgPath := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		return nil, err
	}
	logf, err := os.Create(filepath.Join(dir, "registry.log"))
	if err != nil {
		return nil, err
	}
	r := &registry{addr: addr, cmd: exec.Command("docker-registry", "serve", cfgPath), done: make(chan struct{}), log: logf}
	r.cmd.Stdout, r.cmd.Stderr = logf, logf
	if err := r.cmd.Start(); err != nil {
		logf.Close()
		return nil, err
	}
	go func() { _ = r.cmd.Wait(); close(r.done) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/v2/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return r, nil
			}
		}
		select {
		case <-r.done:
			out, _ := os.ReadFile(logf.Name())
			return nil, fmt.Errorf("docker-registry exited at start-up:\n%s", out)
		default:
		}
		if time.Now().After(deadline) {
			r.stop()
			return nil, errors.New("docker-registry did not answer on " + addr + " within 30s")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (r *registry) stop() {
	if r == nil || r.cmd.Process == nil {
		return
	}
	_ = r.cmd.Process.Kill()
	<-r.done
	r.log.Close()
}

// push makes the plugin directory dir available as ref (addr/zgolden:TAG) in the registry:
// docker plugin create under that name, push, and remove the local copy.
func (r *registry) push(t *testing.T, dir, tag string) string {
	t.Helper()
	ref := r.addr + "/zgolden:" + tag
	_, _ = harness.Output("docker", "plugin", "rm", "--force", ref)
	harness.DockerCmd(t, "plugin", "create", ref, dir)
	defer func() { _, _ = harness.Output("docker", "plugin", "rm", "--force", ref) }()
	harness.DockerCmd(t, "plugin", "push", ref)
	return ref
}

// pushed returns the registry's refs of two builds, v1 (the binary under test) and v2 (the same
// source built with another version string, so an upgrade is visible), pushing them once.
var pushed struct {
	once   sync.Once
	v1, v2 string
	err    string
}

func pushedBuilds(t *testing.T) (v1, v2 string) {
	t.Helper()
	r := theRegistry(t)
	bin := harness.Binary(t)
	pushed.once.Do(func() {
		// A Fatal in here still marks the once done: record failure until the end is reached.
		pushed.err = "pushing the two builds to the local registry failed earlier (see the first test that needed them)"
		pushed.v1 = r.push(t, buildPlugin(t, bin, ""), "v1")
		bin2 := filepath.Join(pkgTemp(t), "zgolden-v2")
		build := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w -X main.version=plugintest-v2", "-o", bin2, "./plugin")
		build.Dir = repo(t)
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := build.CombinedOutput(); err != nil {
			t.Fatalf("go build the v2 binary: %v\n%s", err, out)
		}
		pushed.v2 = r.push(t, buildPlugin(t, bin2, ""), "v2")
		pushed.err = ""
	})
	if pushed.err != "" {
		t.Fatal(pushed.err)
	}
	return pushed.v1, pushed.v2
}

// rootfsVersion runs the zgolden binary inside the installed plugin's rootfs with `version`.
func (m *managed) rootfsVersion(t *testing.T) string {
	t.Helper()
	root := harness.DockerCmd(t, "info", "--format", "{{.DockerRootDir}}")
	bin := filepath.Join(root, "plugins", m.pluginID(t), "rootfs", "usr", "bin", "zgolden")
	return strings.TrimSpace(harness.Run(t, bin, "version"))
}
