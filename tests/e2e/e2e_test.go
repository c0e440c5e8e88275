package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/driver/drivertest"
	"github.com/zgolden/zgolden/tests/harness"
)

// pluginName is the one legacy plugin name this package registers with Docker (see harness.Plugin).
const pluginName = "zgolden-e2e"

// backend starts the plugin on the real backend of this machine: ZFS in the guest, the reflink
// store on the host. leaks lists what the backend holds (datasets, or images and loop devices).
type backend struct {
	id    string // makes this test's volume and container names unique
	p     *harness.Plugin
	leaks func(t *testing.T) []string
	pool  string
	args  []string // the plugin's store arguments, past the harness's own
}

func startBackend(t *testing.T, extra ...string) *backend {
	t.Helper()
	return startBackendEnv(t, nil, extra...)
}

// startBackendEnv is startBackend with env added to the plugin's environment.
func startBackendEnv(t *testing.T, env []string, extra ...string) *backend {
	t.Helper()
	harness.Docker(t)
	if os.Getenv("ZGOLDEN_TEST_ZPOOL") != "" {
		parent := harness.ZFSParent(t)
		b := &backend{pool: harness.RequireZFS(t), id: harness.ID()}
		b.args = append([]string{"--backend", "zfs", "--parent", parent}, extra...)
		b.p = harness.StartPluginEnv(t, pluginName, env, b.args...)
		b.leaks = func(t *testing.T) []string {
			var out []string
			// Spares are the worker's, there while their golden is (harness.WithoutSpares).
			for _, ds := range harness.WithoutSpares(harness.ZFSInventory(t, parent), parent) {
				if ds != parent+"/vol" && ds != parent+"/golden" {
					out = append(out, ds)
				}
			}
			return out
		}
		return b
	}
	root := filepath.Join(t.TempDir(), "root")
	b := &backend{id: harness.ID(), args: append([]string{"--backend", "reflink", "--root", root, "--store-size", "8G"}, extra...)}
	// The store file stays mounted when the plugin stops (volumes live on it); unmount it after
	// the plugin has stopped, which cleanups registered earlier do.
	t.Cleanup(func() {
		if out, err := harness.Output("umount", filepath.Join(root, "store")); err != nil && !strings.Contains(out, "not mounted") {
			t.Errorf("cleanup: umount the store: %v\n%s", err, out)
		}
	})
	b.p = harness.StartPluginEnv(t, pluginName, env, b.args...)
	b.leaks = func(t *testing.T) []string {
		harness.ReflinkUnlinked(t, filepath.Join(root, "store"))
		var out []string
		_ = filepath.WalkDir(filepath.Join(root, "store", "volumes"), func(p string, d os.DirEntry, err error) error {
			if err == nil && !d.IsDir() {
				out = append(out, p)
			}
			return nil
		})
		for _, l := range strings.Split(harness.Run(t, "losetup", "-a"), "\n") {
			if strings.Contains(l, filepath.Join(root, "store", "volumes")) {
				out = append(out, l)
			}
		}
		return out
	}
	return b
}

// docker runs the docker command line; arguments starting with "zg-" name this test's volumes or
// containers and are made unique.
func (b *backend) docker(t *testing.T, args ...string) string {
	t.Helper()
	return harness.DockerCmd(t, b.names(args)...)
}

func (b *backend) names(args []string) []string {
	out := make([]string, len(args))
	for i, a := range args {
		if strings.HasPrefix(a, "zg-") {
			a = b.n(a)
		}
		out[i] = a
	}
	return out
}

// n makes a volume or container name unique to this plugin instance: Docker remembers volume
// names per driver, even after a test's plugin is gone.
func (b *backend) n(name string) string { return "zg" + b.id + "-" + name }

// volume creates a volume through docker and removes it (and its containers) at the end.
func (b *backend) volume(t *testing.T, name string, opts ...string) {
	t.Helper()
	name = b.n(name)
	args := []string{"volume", "create", "--driver", b.p.Name}
	for _, o := range opts {
		args = append(args, "-o", o)
	}
	t.Cleanup(func() { _, _ = harness.Output("docker", "volume", "rm", "-f", name) })
	b.docker(t, append(args, name)...)
}

func (b *backend) container(t *testing.T, name string, args ...string) {
	t.Helper()
	name = b.n(name)
	for i, a := range args { // "vol:/path" names a volume of this test
		if v, p, ok := strings.Cut(a, ":/"); ok && i > 0 && args[i-1] == "-v" && strings.HasPrefix(v, "zg-") {
			args[i] = b.n(v) + ":/" + p
		}
	}
	// Registered first: a `docker run` that fails after creating the container leaves it behind.
	t.Cleanup(func() { _, _ = harness.Output("docker", "rm", "-f", name) })
	// No test needs a network, and a bridge is one more thing that can be missing.
	b.docker(t, append([]string{"run", "-d", "--network", "none", "--name", name}, args...)...)
}

func (b *backend) importGolden(t *testing.T, project string) {
	t.Helper()
	src := t.TempDir()
	drivertest.MakeTree(t, src)
	if out, err := b.p.Admin(t, "golden", "import", src, "--project", project); err != nil {
		t.Fatalf("zgolden golden import: %v\n%s", err, out)
	}
}

// waitSpares waits, up to three minutes, until zgolden status shows n spares ready for project.
func (b *backend) waitSpares(t *testing.T, project string, n int) {
	t.Helper()
	var last string
	for deadline := time.Now().Add(3 * time.Minute); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		st, err := b.status(t)
		if err == nil && st.SparesReady[project] == n {
			return
		}
		last = fmt.Sprint(err)
	}
	t.Fatalf("%s never had %d spares ready: %s", project, n, last)
}

// status is what `zgolden status --json` says; its error carries the command's output.
func (b *backend) status(t *testing.T) (driver.Status, error) {
	t.Helper()
	var st driver.Status
	out, err := b.p.Admin(t, "status", "--json")
	if err == nil {
		err = json.Unmarshal([]byte(out), &st)
	}
	if err != nil {
		return st, fmt.Errorf("zgolden status --json: %w\n%s", err, out)
	}
	return st, nil
}

// claimed reports whether the plugin's log says volume's Create claimed a spare.
func claimed(logs, volume string) bool {
	field := regexp.MustCompile(` volume=` + regexp.QuoteMeta(volume) + `( |$)`)
	for _, l := range strings.Split(logs, "\n") {
		if strings.Contains(l, `msg="claimed a spare"`) && field.MatchString(l) {
			return true
		}
	}
	return false
}

type inspect struct {
	Name       string
	Driver     string
	Mountpoint string
	Status     map[string]any
}

func (b *backend) inspect(t *testing.T, name string) inspect {
	t.Helper()
	var out []inspect
	if err := json.Unmarshal([]byte(b.docker(t, "volume", "inspect", name)), &out); err != nil || len(out) != 1 {
		t.Fatalf("docker volume inspect %s: %v", name, err)
	}
	return out[0]
}

// TestGoldenClonesThroughDocker is the main job: a golden, two volumes cloned from it through
// `docker volume create`, containers on both at once with isolated writes, a Docker daemon
// inside one (overlay2 on the clone's XFS), and `docker volume rm` leaving nothing behind.
func TestGoldenClonesThroughDocker(t *testing.T) {
	b := startBackend(t)
	b.importGolden(t, "prj_x")
	// The plugin runs with its defaults, so the golden gets its warm spares (--spares 2), and
	// both Creates claim one: this suite tests what an install runs.
	b.waitSpares(t, "prj_x", 2)
	b.volume(t, "zg-a", "golden=prj_x")
	b.volume(t, "zg-b", "golden=prj_x")
	for _, v := range []string{"zg-a", "zg-b"} {
		if !claimed(b.p.Logs(), b.n(v)) {
			t.Errorf("docker volume create %s did not claim a spare; the plugin's log:\n%s", v, b.p.Logs())
		}
	}

	b.container(t, "zg-ca", "-v", "zg-a:/data", harness.BusyboxImage(), "sleep", "600")
	b.container(t, "zg-cb", "-v", "zg-b:/data", harness.BusyboxImage(), "sleep", "600")
	for _, c := range []string{"zg-ca", "zg-cb"} {
		if got := b.docker(t, "exec", c, "cat", "/data/README"); got != "golden content" {
			t.Fatalf("%s reads %q from the golden's README", c, got)
		}
		if got := b.docker(t, "exec", c, "readlink", "/data/link"); got != "layers/d01/f0001" {
			t.Fatalf("%s: symlink reads %q", c, got)
		}
		if n := b.docker(t, "exec", c, "sh", "-c", "ls /data/layers/*/ | grep -c '^f'"); n != fmt.Sprint(drivertest.TreeFiles) {
			t.Fatalf("%s sees %s golden files, want %d", c, n, drivertest.TreeFiles)
		}
	}
	b.docker(t, "exec", "zg-ca", "sh", "-c", "echo only-a > /data/mine")
	if _, err := harness.Output("docker", b.names([]string{"exec", "zg-cb", "cat", "/data/mine"})...); err == nil {
		t.Fatal("a write in volume zg-a is visible in zg-b")
	}

	in := b.inspect(t, "zg-a")
	if in.Driver != b.p.Name || in.Status["golden"] != "prj_x" || in.Status["generation"] != float64(1) || in.Status["mounted"] != true {
		t.Fatalf("docker volume inspect zg-a = %+v", in)
	}
	for _, k := range []string{"created", "written_bytes", "logical_bytes", "origin", "size"} {
		if _, ok := in.Status[k]; !ok {
			t.Errorf("docker volume inspect Status lacks %q: %v", k, in.Status)
		}
	}

	// Docker-in-Docker: the clone is /var/lib/docker of an inner engine, which must pick
	// overlay2 on xfs (it refuses overlay2 on a filesystem without d_type).
	b.docker(t, "rm", "-f", "zg-cb")
	b.container(t, "zg-dind", append(harness.DindArgs(t), "-v", "zg-b:/var/lib/docker", harness.DindImage(), "dind-dockerd")...)
	var info string
	deadline := time.Now().Add(90 * time.Second)
	for {
		out, err := harness.Output("docker", b.names([]string{"exec", "zg-dind", "docker", "info", "--format", "{{.Driver}} {{json .DriverStatus}}"})...)
		if err == nil {
			info = strings.TrimSpace(out)
			break
		}
		if time.Now().After(deadline) {
			logs, _ := harness.Output("docker", "logs", b.n("zg-dind"))
			t.Fatalf("the inner dockerd never became ready: %v\n%s\n%s", err, out, logs)
		}
		time.Sleep(time.Second)
	}
	if !strings.HasPrefix(info, "overlay2 ") || !strings.Contains(info, `["Backing Filesystem","xfs"]`) {
		t.Fatalf("inner docker info = %q; want overlay2 backed by xfs", info)
	}
	// The inner engine runs a container from an image it imports onto the clone.
	b.docker(t, "exec", "zg-dind", "docker", "import", "/zgolden-images/busybox.tar", "inner:latest")
	if got := b.docker(t, "exec", "zg-dind", "docker", "run", "--rm", "--network", "none", "inner:latest", "echo", "inner-ok"); got != "inner-ok" {
		t.Fatalf("inner container said %q", got)
	}

	b.docker(t, "rm", "-f", "zg-ca", "zg-dind")
	b.docker(t, "volume", "rm", "zg-a", "zg-b")
	if left := b.leaks(t); len(left) > 0 && !onlyGoldens(left) {
		t.Fatalf("left behind after docker volume rm: %v", left)
	}
	assertNoMounts(t, b.p.MountRoot)
	if b.pool != "" {
		if out := harness.Run(t, "zpool", "status", "-D", b.pool); !strings.Contains(out, "no DDT entries") {
			t.Fatalf("zpool status -D shows dedup-table entries:\n%s", out)
		}
	}
}

// onlyGoldens reports whether what is left is only the golden itself (which volume rm keeps).
func onlyGoldens(left []string) bool {
	for _, l := range left {
		if !strings.Contains(l, "/golden") {
			return false
		}
	}
	return true
}

func assertNoMounts(t *testing.T, mountRoot string) {
	t.Helper()
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(data), "\n") {
		if strings.Contains(l, " "+mountRoot+"/") {
			t.Fatalf("a volume is still mounted: %s", l)
		}
	}
}

// TestRestartWithMountedVolumes: kill -9 the plugin while a container uses a volume, start it
// again: Docker still lists every volume, the container keeps its data, stopping it unmounts, and
// removal works.
func TestRestartWithMountedVolumes(t *testing.T) {
	b := startBackend(t)
	b.importGolden(t, "prj")
	b.volume(t, "zg-live", "golden=prj")
	b.volume(t, "zg-idle")
	b.container(t, "zg-user", "-v", "zg-live:/data", harness.BusyboxImage(), "sleep", "600")
	b.docker(t, "exec", "zg-user", "sh", "-c", "echo before > /data/marker")

	b.p.Stop(syscall.SIGKILL)
	b.p.Start()

	ls := strings.Fields(b.docker(t, "volume", "ls", "-q", "--filter", "driver="+b.p.Name))
	slices.Sort(ls)
	if !slices.Equal(ls, b.names([]string{"zg-idle", "zg-live"})) {
		t.Fatalf("after kill -9 and restart, docker volume ls = %v", ls)
	}
	if got := b.docker(t, "exec", "zg-user", "cat", "/data/marker"); got != "before" {
		t.Fatalf("container lost its data across the plugin restart: %q", got)
	}
	if in := b.inspect(t, "zg-live"); in.Status["mounted"] != true || in.Status["mounts"] != float64(1) {
		t.Fatalf("after restart, inspect = %+v", in.Status)
	}
	b.docker(t, "rm", "-f", "zg-user") // Docker unmounts with the ID it mounted with before the restart
	if in := b.inspect(t, "zg-live"); in.Status["mounted"] != false {
		t.Fatalf("after the container stopped, inspect = %+v", in.Status)
	}
	assertNoMounts(t, b.p.MountRoot)
	// A second container mounts again after the restart (nouuid on a remount).
	b.container(t, "zg-user2", "-v", "zg-live:/data", harness.BusyboxImage(), "sleep", "600")
	if got := b.docker(t, "exec", "zg-user2", "cat", "/data/marker"); got != "before" {
		t.Fatalf("remount after restart reads %q", got)
	}
	b.docker(t, "rm", "-f", "zg-user2")
	b.docker(t, "volume", "rm", "zg-live", "zg-idle")
	if left := b.leaks(t); len(left) > 0 && !onlyGoldens(left) {
		t.Fatalf("left behind: %v", left)
	}
}

// TestSecondPluginIsRefused: a second zgolden on the same store (the parent dataset with the same
// record directory, or the reflink root) exits at start and names the first one's pid, and the
// first goes on serving; two would write the same record slots, or delete each other's half-made
// images as leftovers.
func TestSecondPluginIsRefused(t *testing.T) {
	b := startBackend(t)
	b.volume(t, "zg-first")
	state := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, harness.Binary(t), append([]string{"serve",
		"--socket", filepath.Join(state, "second.sock"), "--admin-socket", filepath.Join(state, "admin.sock"),
		"--state-dir", state, "--mount-root", filepath.Join(state, "mounts")}, b.args...)...).CombinedOutput()
	if err == nil || ctx.Err() != nil {
		t.Fatalf("a second zgolden on the same store did not exit with an error (%v, %v):\n%s", err, ctx.Err(), out)
	}
	if want := fmt.Sprintf("another process (pid %d)", b.p.Pid()); !strings.Contains(string(out), want) {
		t.Fatalf("the second zgolden's error does not say %q:\n%s", want, out)
	}
	b.volume(t, "zg-second")
	b.docker(t, "volume", "rm", "zg-first", "zg-second")
	if left := b.leaks(t); len(left) > 0 && !onlyGoldens(left) {
		t.Fatalf("left behind: %v", left)
	}
}

// TestDockerErrorsAreClear: what a user mistypes reaches `docker volume create` as an error that
// says what is allowed, and creates nothing.
func TestDockerErrorsAreClear(t *testing.T) {
	b := startBackend(t)
	cases := []struct {
		opts []string
		want string
	}{
		{[]string{"-o", "mountpoint=/etc"}, "unknown option"},
		{[]string{"-o", "dedup=on"}, "unknown option"},
		{[]string{"-o", "size=-1G"}, "not a size"},
		{[]string{"-o", "size=10Q"}, "unknown unit"},
		{[]string{"-o", "golden=../../etc"}, "not allowed"},
		{[]string{"-o", "golden=prj", "-o", "generation=7"}, "generation"},
		{[]string{"-o", "from=zg-nothing", "-o", "golden=prj"}, "cannot be combined with golden"},
		{[]string{"-o", "from=zg-nothing"}, "no zgolden volume has that name"},
	}
	for _, c := range cases {
		args := append([]string{"volume", "create", "--driver", b.p.Name}, c.opts...)
		out, err := harness.Output("docker", append(args, b.n("zg-bad"))...)
		if err == nil || !strings.Contains(out, c.want) {
			t.Errorf("docker volume create %v: err=%v output=%q; want an error mentioning %q", c.opts, err, out, c.want)
		}
	}
	if ls := b.docker(t, "volume", "ls", "-q", "--filter", "driver="+b.p.Name); ls != "" {
		t.Fatalf("failed creates left volumes: %q", ls)
	}
	if left := b.leaks(t); len(left) > 0 {
		t.Fatalf("failed creates left objects: %v", left)
	}
}

// TestForkThroughDocker: `docker volume create -o from=VOLUME` copies a volume that a running
// container is writing (frozen for the instant), `docker volume inspect` names the origin, and
// the source can be removed while its fork lives on.
func TestForkThroughDocker(t *testing.T) {
	b := startBackend(t)
	b.importGolden(t, "prj")
	b.volume(t, "zg-src", "golden=prj")
	b.container(t, "zg-writer", "-v", "zg-src:/data", harness.BusyboxImage(), "sleep", "600")
	b.docker(t, "exec", "zg-writer", "sh", "-c", "echo forked-state > /data/marker")
	b.volume(t, "zg-fork", "from="+b.n("zg-src"))
	b.docker(t, "exec", "zg-writer", "sh", "-c", "echo later > /data/marker")

	in := b.inspect(t, "zg-fork")
	if in.Status["fork_of"] != b.n("zg-src") || in.Status["golden"] != "prj" || !strings.HasPrefix(fmt.Sprint(in.Status["origin"]), "fork of volume") {
		t.Fatalf("docker volume inspect of the fork = %+v", in.Status)
	}
	b.docker(t, "rm", "-f", "zg-writer")
	b.docker(t, "volume", "rm", "zg-src") // a fork never pins its source
	b.container(t, "zg-reader", "-v", "zg-fork:/data", harness.BusyboxImage(), "sleep", "600")
	if got := b.docker(t, "exec", "zg-reader", "cat", "/data/marker", "/data/README"); got != "forked-state\ngolden content" {
		t.Fatalf("the fork reads %q; want the source's state at the fork and the golden's files", got)
	}
	b.docker(t, "rm", "-f", "zg-reader")
	b.docker(t, "volume", "rm", "zg-fork")
	if left := b.leaks(t); len(left) > 0 && !onlyGoldens(left) {
		t.Fatalf("left behind after removing the source and its fork: %v", left)
	}
}
