package plugin

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/zgolden/zgolden/tests/harness"
	"github.com/zgolden/zgolden/zfsutil"
)

// hostOnly skips tests that prove the reflink store on the host's Docker engine when they run in
// the ZFS guest, which has TestManagedPluginZFS instead.
func hostOnly(t *testing.T) {
	t.Helper()
	if os.Getenv("ZGOLDEN_TEST_ZPOOL") != "" {
		t.Skip("host test (reflink store); the guest runs TestManagedPluginZFS")
	}
}

// TestManagedPluginFromDirectory is `make plugin` and what follows: docker plugin create from the
// assembled directory (no registry), enable, a golden seeded through the admin command line on the
// host, a volume cloned from it through docker and mounted into a container; disable and enable
// with the volume existing; docker plugin upgrade to a second build from a registry; and removal.
// The volume and its data survive every step.
func TestManagedPluginFromDirectory(t *testing.T) {
	hostOnly(t)
	m := newManaged(t)
	buildPlugin(t, harness.Binary(t), m.name)
	m.enable(t, "ZGOLDEN_STORE_SIZE=8G", "ZGOLDEN_LOG_LEVEL=debug")

	if st := m.admin(t, "status"); !strings.Contains(st, "reflink") {
		t.Fatalf("zgolden status through the plugin's admin socket does not name the reflink backend:\n%s", st)
	}
	m.seedGolden(t, "prj_m")
	if ls := m.admin(t, "golden", "ls"); !strings.Contains(ls, "prj_m") {
		t.Fatalf("zgolden golden ls does not list the imported golden:\n%s", ls)
	}
	vol := m.volume(t, "a", "golden=prj_m")
	if st := volumeStatus(t, vol); st["golden"] != "prj_m" || st["generation"] != float64(1) {
		t.Fatalf("docker volume inspect %s: Status = %v, want a clone of prj_m generation 1", vol, st)
	}
	if got := m.run(t, vol, "cat", "/data/README"); got != "golden content" {
		t.Fatalf("the container reads %q from the golden's README", got)
	}
	m.run(t, vol, "sh", "-c", "echo session-data > /data/mine")
	m.reachesDocker(t, vol)
	if mt := m.metrics(t); !strings.Contains(mt, `zgolden_build_info{backend="reflink"`) || !strings.Contains(mt, `zgolden_operation_duration_seconds_count{op="mount",result="ok"}`) {
		t.Errorf("the managed plugin's metrics name no reflink backend or no mount:\n%s", mt)
	}

	// Docker refuses to disable a plugin that volumes use unless forced; the volumes stay.
	if out, err := harness.Output("docker", "plugin", "disable", m.name); err == nil || !strings.Contains(out, "in use") {
		t.Fatalf("docker plugin disable with a volume: err=%v, want 'in use'\n%s", err, out)
	}
	harness.DockerCmd(t, "plugin", "disable", "--force", m.name)
	harness.DockerCmd(t, "plugin", "enable", m.name)
	if ls := harness.DockerCmd(t, "volume", "ls", "--quiet", "--filter", "driver="+m.name); !strings.Contains(ls, vol) {
		t.Fatalf("after disable and enable, docker volume ls lacks %s:\n%s", vol, ls)
	}
	if got := m.run(t, vol, "cat", "/data/mine", "/data/README"); got != "session-data\ngolden content" {
		t.Fatalf("after disable and enable the volume holds %q", got)
	}

	// Upgrade to a second build: Docker wants the plugin disabled, swaps the rootfs, keeps the
	// settings and the id (and so the propagated mount); the volume is untouched.
	_, v2 := pushedBuilds(t)
	harness.DockerCmd(t, "plugin", "disable", "--force", m.name)
	// --skip-remote-check: this plugin was created locally, not pulled from v2's repository.
	harness.DockerCmd(t, "plugin", "upgrade", "--grant-all-permissions", "--skip-remote-check", m.name, v2)
	// Docker 20.10 keeps `docker plugin set` environment across an upgrade but resets mount
	// sources to the new config.json's defaults (the README says so): set data.source again.
	if env := harness.DockerCmd(t, "plugin", "inspect", "--format", "{{json .Settings.Env}}", m.name); !strings.Contains(env, "ZGOLDEN_STORE_SIZE=8G") {
		t.Fatalf("the upgrade lost the environment settings: %s", env)
	}
	m.enable(t)
	if ref := harness.DockerCmd(t, "plugin", "inspect", "--format", "{{.PluginReference}}", m.name); ref != v2 {
		t.Fatalf("after the upgrade the plugin comes from %q, want %q", ref, v2)
	}
	if v := m.rootfsVersion(t); v != "zgolden plugintest-v2" {
		t.Fatalf("after the upgrade the plugin's binary says %q, want the v2 build", v)
	}
	if got := m.run(t, vol, "cat", "/data/mine"); got != "session-data" {
		t.Fatalf("after the upgrade the volume holds %q", got)
	}
	if st := m.admin(t, "status"); !strings.Contains(st, "reflink") {
		t.Fatalf("zgolden status after the upgrade:\n%s", st)
	}

	m.rmVolume(t, vol)
	if ls := harness.DockerCmd(t, "volume", "ls", "--quiet", "--filter", "driver="+m.name); ls != "" {
		t.Fatalf("volumes left after docker volume rm: %s", ls)
	}
	harness.DockerCmd(t, "plugin", "disable", m.name)
	harness.DockerCmd(t, "plugin", "rm", m.name)
}

// TestPluginInstallFromRegistry is `docker plugin install` for real: from a registry (Debian's
// docker-registry on loopback), with the permissions granted and settings given at install time,
// then a cold volume (no golden) used by a container and removed.
func TestPluginInstallFromRegistry(t *testing.T) {
	hostOnly(t)
	v1, _ := pushedBuilds(t)
	m := newManaged(t)
	harness.DockerCmd(t, "plugin", "install", "--grant-all-permissions", "--alias", pluginName, v1,
		"data.source="+m.data, "ZGOLDEN_STORE_SIZE=8G", "ZGOLDEN_DEFAULT_SIZE=1G")
	if en := harness.DockerCmd(t, "plugin", "inspect", "--format", "{{.Enabled}}", m.name); en != "true" {
		t.Fatalf("docker plugin install left the plugin enabled=%s", en)
	}
	vol := m.volume(t, "cold")
	if st := volumeStatus(t, vol); st["size"] != "1.0 GiB" {
		t.Fatalf("a volume without -o size should have ZGOLDEN_DEFAULT_SIZE=1G: Status = %v", st)
	}
	m.run(t, vol, "sh", "-c", "echo hello > /data/f")
	if got := m.run(t, vol, "cat", "/data/f"); got != "hello" {
		t.Fatalf("the volume holds %q", got)
	}
	if st := m.admin(t, "status"); !strings.Contains(st, "reflink") {
		t.Fatalf("zgolden status:\n%s", st)
	}
	m.rmVolume(t, vol)
	harness.DockerCmd(t, "plugin", "disable", m.name)
	harness.DockerCmd(t, "plugin", "rm", m.name)
}

// TestManagedPluginZFS runs in the qemu guest with the real zfs module: the plugin's own zfs
// userland (Debian bookworm's 2.1) drives the guest's pool through /dev/zfs. Create, enable, a
// golden imported through the admin socket, a volume cloned from it through docker and read
// by a container, and removal leaving no dataset behind.
func TestManagedPluginZFS(t *testing.T) {
	parent := harness.ZFSParent(t)
	t.Logf("guest: zfs module %s; userland %s", strings.TrimSpace(readFile("/sys/module/zfs/version")),
		strings.Join(strings.Fields(harness.Run(t, "zfs", "version")), " "))
	m := newManaged(t)
	buildPlugin(t, harness.Binary(t), m.name)
	m.enable(t, "ZGOLDEN_BACKEND=zfs", "ZGOLDEN_PARENT="+parent, "ZGOLDEN_DEFAULT_SIZE=1G", "ZGOLDEN_LOG_LEVEL=debug")
	if st := m.admin(t, "status"); !strings.Contains(st, "zfs") {
		t.Fatalf("zgolden status does not name the zfs backend:\n%s", st)
	}
	// Status names the module it drives and the userland it drives it with: the plugin's own.
	var st map[string]any
	if err := json.Unmarshal([]byte(m.admin(t, "status", "--json")), &st); err != nil {
		t.Fatalf("zgolden status --json: %v", err)
	}
	if mod := strings.TrimSpace(readFile(zfsutil.ModuleVersionFile)); st["zfs_module"] != mod {
		t.Errorf("status zfs_module = %v, want the guest's module %s", st["zfs_module"], mod)
	}
	if u, _ := st["zfs_userland"].(string); !strings.HasPrefix(u, pluginUserlandSeries+".") {
		t.Errorf("status zfs_userland = %v, want the plugin's bundled %s.x userland", st["zfs_userland"], pluginUserlandSeries)
	}
	m.seedGolden(t, "prj_z")
	vol := m.volume(t, "z", "golden=prj_z")
	ds := parent + "/vol/" + vol
	if origin := strings.TrimSpace(harness.Run(t, "zfs", "get", "-H", "-o", "value", "origin", ds)); !strings.HasPrefix(origin, parent+"/golden/prj_z/") {
		t.Fatalf("%s has origin %q: want a clone of prj_z's golden", ds, origin)
	}
	if got := m.run(t, vol, "cat", "/data/README"); got != "golden content" {
		t.Fatalf("the container reads %q from the golden's README", got)
	}
	m.run(t, vol, "sh", "-c", "echo zfs-session > /data/mine")
	if got := m.run(t, vol, "cat", "/data/mine"); got != "zfs-session" {
		t.Fatalf("the volume holds %q", got)
	}
	m.reachesDocker(t, vol)
	t.Logf("plugin log:\n%s", m.logs())
	m.rmVolume(t, vol)
	// Remove records the removal and returns; the plugin's worker destroys the dataset right
	// after (zfsstore/removal.go), through its records under the data mount.
	if left := harness.ZFSInventory(t, parent, filepath.Join(m.data, "zfs-records")); slices.Contains(left, ds) {
		t.Fatalf("%s still exists a minute after docker volume rm: %v", ds, left)
	}
	if mt := m.metrics(t); !strings.Contains(mt, `zgolden_build_info{backend="zfs"`) || !strings.Contains(mt, `zgolden_ddt_entries 0`) {
		t.Errorf("the managed plugin's metrics on ZFS name no zfs backend or no empty dedup table:\n%s", mt)
	}
	harness.DockerCmd(t, "plugin", "disable", m.name)
	harness.DockerCmd(t, "plugin", "rm", m.name)
}

// pluginUserlandSeries is the zfs userland rootfs/build.sh ships: Debian 12's.
const pluginUserlandSeries = "2.1"

// TestManagedPluginRefusesAnUnprovenModule narrows ZGOLDEN_ZFS_PROVEN to the plugin's own series
// on a guest whose module is newer: the plugin must refuse to start, so `docker plugin enable`
// fails, and its log must say why, naming both versions and the host daemon, before any zfs
// command touched the pool.
func TestManagedPluginRefusesAnUnprovenModule(t *testing.T) {
	parent := harness.ZFSParent(t)
	mod, err := zfsutil.ParseRelease(readFile(zfsutil.ModuleVersionFile))
	if err != nil {
		t.Fatal(err)
	}
	if mod.Series() == pluginUserlandSeries {
		t.Skipf("the guest's module %s is the plugin's own series: no pair to refuse", mod)
	}
	m := newManaged(t)
	buildPlugin(t, harness.Binary(t), m.name)
	harness.DockerCmd(t, "plugin", "set", m.name, "data.source="+m.data, "ZGOLDEN_BACKEND=zfs",
		"ZGOLDEN_PARENT="+parent, "ZGOLDEN_ZFS_PROVEN="+pluginUserlandSeries)
	out, err := harness.Output("docker", "plugin", "enable", m.name)
	if err == nil {
		t.Fatalf("docker plugin enable succeeded with module %s and ZGOLDEN_ZFS_PROVEN=%s:\n%s", mod, pluginUserlandSeries, out)
	}
	if en := harness.DockerCmd(t, "plugin", "inspect", "--format", "{{.Enabled}}", m.name); en != "false" {
		t.Fatalf("after the refused enable the plugin is enabled=%s", en)
	}
	logs := m.logs()
	for _, want := range []string{"not proven", mod.String(), "zfs userland " + pluginUserlandSeries + ".", "host daemon"} {
		if !strings.Contains(logs, want) {
			t.Errorf("the refusal in the plugin's log lacks %q:\n%s", want, logs)
		}
	}
	if out, err := harness.Output("zfs", "list", "-H", "-o", "name", parent); err == nil {
		t.Errorf("the refused plugin made its parent dataset: %s", out)
	}
}

func readFile(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "unknown (" + err.Error() + ")"
	}
	return string(b)
}

// reachesDocker shows that the managed plugin asks the engine through the socket config.json
// binds: a reap dry run lists a volume no container ever used, and not used, which a stopped
// container still references (the plugin cannot know that but from the engine).
func (m *managed) reachesDocker(t *testing.T, used string) {
	t.Helper()
	idle := m.volume(t, "idle")
	c := "zgp" + m.id + "-stopped"
	t.Cleanup(func() { _, _ = harness.Output("docker", "rm", "-f", c) })
	harness.DockerCmd(t, "run", "--name", c, "--network", "none", "-v", used+":/data", harness.BusyboxImage(), "true")
	time.Sleep(1500 * time.Millisecond) // past --after 1s since both were last unmounted
	var rs []struct{ Volume, Reason string }
	out := m.admin(t, "volume", "reap", "--json", "--dry-run", "--after", "1s")
	if err := json.Unmarshal([]byte(out), &rs); err != nil {
		t.Fatalf("zgolden volume reap --json: %v\n%s", err, out)
	}
	if len(rs) != 1 || rs[0].Volume != idle {
		t.Fatalf("reap --dry-run through the managed plugin = %+v; want only %s (the engine lists a stopped container on %s)\nplugin log:\n%s", rs, idle, used, m.logs())
	}
	harness.DockerCmd(t, "rm", c)
	m.rmVolume(t, idle)
}
