package e2e

import (
	"encoding/json"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/zgolden/zgolden/tests/harness"
)

type finding struct {
	Check, Level, Detail, Action string
}

// doctor runs `zgolden doctor --json` and returns its findings and whether it exited 0.
func doctor(t *testing.T, p *harness.Plugin) (map[string]finding, bool) {
	t.Helper()
	out, err := p.Admin(t, "doctor", "--json")
	i, j := strings.Index(out, "["), strings.LastIndex(out, "]")
	if i < 0 || j < i {
		t.Fatalf("zgolden doctor --json printed no findings (%v):\n%s", err, out)
	}
	var fs []finding
	if jerr := json.Unmarshal([]byte(out[i:j+1]), &fs); jerr != nil {
		t.Fatalf("zgolden doctor --json: %v\n%s", jerr, out)
	}
	byCheck := map[string]finding{}
	for _, f := range fs {
		if f.Level != "ok" && f.Level != "warn" && f.Level != "problem" {
			t.Errorf("finding %+v has level %q", f, f.Level)
		}
		byCheck[f.Check] = f
	}
	if err != nil && !strings.Contains(out, "problem(s) need action") {
		t.Fatalf("zgolden doctor failed without a finding: %v\n%s", err, out)
	}
	return byCheck, err == nil
}

func expect(t *testing.T, fs map[string]finding, check, level, says string) {
	t.Helper()
	f, ok := fs[check]
	if !ok || f.Level != level || !strings.Contains(f.Detail, says) {
		t.Errorf("doctor's %q finding = %+v; want level %s saying %q (all: %+v)", check, f, level, says, fs)
	}
}

// TestDoctor trips each check it can on this machine's backend and shows it clear again: a
// reserve above the free space is a problem (exit 1), discard off a warning; on ZFS a dataset of
// the pool with dedup=on is a problem, volumes with 16 KiB blocks a warning, and the pool's
// health and txg times are reported; on a file-backed reflink store the host's space behind it.
func TestDoctor(t *testing.T) {
	p, _, backend := metricsPlugin(t, "--reserve", "100T", "--discard=false", "--volblocksize", "16K") // a reserve above any test pool or store
	fs, ok := doctor(t, p)
	if ok {
		t.Error("doctor exited 0 with the free space below the reserve")
	}
	expect(t, fs, "space", "problem", "below the reserve")
	expect(t, fs, "discard", "warn", "without discard")
	// The unit ordering itself is tested in plugin (TestBootOrder); a machine that did not boot
	// with systemd, as the test machines and guests, says so.
	if _, err := os.Stat("/run/systemd/system"); err != nil {
		expect(t, fs, "boot order", "ok", "not a systemd host")
	} else if _, ok := fs["boot order"]; !ok {
		t.Errorf("doctor has no boot order finding on a systemd host: %+v", fs)
	}
	if backend == "zfs" {
		expect(t, fs, "dedup", "ok", "no dataset")
		expect(t, fs, "dedup table", "ok", "no dedup table entries")
		expect(t, fs, "pool", "ok", "ONLINE")
		expect(t, fs, "transaction groups", "ok", "zfs_dirty_data_max")
		expect(t, fs, "zfs versions", "ok", "module")

		pool := harness.RequireZFS(t)
		other := pool + "/tdedup" + harness.ID() // beside zgolden's parent: doctor looks at the whole pool
		harness.Run(t, "zfs", "create", "-o", "dedup=on", other)
		t.Cleanup(func() { _, _ = harness.Output("zfs", "destroy", "-r", other) })
		fs, _ = doctor(t, p)
		expect(t, fs, "dedup", "problem", other+"=on")
		harness.Run(t, "zfs", "destroy", "-r", other)
	} else {
		expect(t, fs, "store", "ok", "reflinks")
		if _, file := fs["store file"]; file || strings.Contains(fs["store"].Detail, "(file)") {
			expect(t, fs, "store file", "ok", "sparse store file")
		}
	}

	// Without the reserve: exit 0, and on ZFS a volume made with 16 KiB blocks is reported.
	p.Stop(syscall.SIGTERM)
	p2, _, _ := metricsPlugin(t, "--volblocksize", "16K", "--reserve", "1%")
	vol := "zd" + harness.ID()
	harness.DockerCmd(t, "volume", "create", "--driver", p2.Name, vol)
	t.Cleanup(func() { _, _ = harness.Output("docker", "volume", "rm", vol) })
	fs, ok = doctor(t, p2)
	if !ok {
		t.Errorf("doctor exited 1 with nothing to act on: %+v", fs)
	}
	expect(t, fs, "space", "ok", "above the reserve")
	if backend == "zfs" {
		expect(t, fs, "volblocksize", "warn", "16.0 KiB")
	}
	if _, has := fs["discard"]; has {
		t.Errorf("doctor warns of discard with discard on: %+v", fs["discard"])
	}
	expect(t, fs, "mount propagation", "ok", "dockerd")

	// The same plugin in a mount namespace of its own, on private mounts, as a unit with
	// PrivateMounts=yes starts it: its volume mounts never reach dockerd.
	p2.Stop(syscall.SIGTERM)
	p2.Wrap("unshare", "--mount", "--propagation", "private", "--")
	p2.Start()
	fs, ok = doctor(t, p2)
	if ok {
		t.Error("doctor exited 0 for a plugin whose mounts cannot reach dockerd")
	}
	expect(t, fs, "mount propagation", "problem", "never reach dockerd")
}
