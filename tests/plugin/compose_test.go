package plugin

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/zgolden/zgolden/tests/harness"
)

// compose runs Debian's docker-compose (v1) on examples/FILE plus an override for this host,
// with extra environment, and returns its output or fails the test.
type compose struct {
	project  string
	files    []string
	env      []string
	override string
	down     bool // the test already took the project down
}

// cleanup takes the project down (with its volumes) when the test ends, unless the test did:
// a second down would ask Docker about volume names it no longer knows, which is slow (see cmd).
func (c *compose) cleanup(t *testing.T) {
	t.Cleanup(func() {
		if !c.down {
			if out, err := c.cmd("down", "--volumes", "--timeout", "5"); err != nil {
				t.Errorf("cleanup: docker-compose down: %v\n%s", err, out)
			}
		}
	})
}

func (c *compose) cmd(args ...string) (string, error) {
	argv := []string{"--project-name", c.project}
	for _, f := range append(c.files, c.override) {
		argv = append(argv, "--file", f)
	}
	cmd := exec.Command("docker-compose", append(argv, args...)...)
	// Compose asks Docker whether the volume exists before creating it; for a name Docker does
	// not know, Docker asks every volume plugin it ever knew, retrying dead ones for ~15 s each,
	// which on a host that ran other plugin tests outlasts compose's default 60 s HTTP timeout.
	cmd.Env = append(append(os.Environ(), "COMPOSE_HTTP_TIMEOUT=600"), c.env...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (c *compose) run(t *testing.T, args ...string) string {
	t.Helper()
	start := time.Now()
	out, err := c.cmd(args...)
	t.Logf("docker-compose %s: %s", strings.Join(args, " "), time.Since(start).Round(time.Second))
	if err != nil {
		t.Fatalf("docker-compose %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(out)
}

// overrideFor writes a compose override that adapts an example's service to this test: the test
// images, no network, and --privileged's equivalent where this host cannot grant --privileged
// itself (harness.DindArgs says which). JSON is YAML. (The volume driver comes from the example's
// ${ZGOLDEN_DRIVER}: an override of a top-level volume replaces it whole, driver_opts included.)
func overrideFor(t *testing.T, service, image string, command []string) string {
	t.Helper()
	svc := map[string]any{"image": image, "command": command, "network_mode": "none"}
	args := harness.DindArgs(t)
	for i := 0; i < len(args); i++ {
		flag := args[i]
		if flag == "--privileged" {
			svc["privileged"] = true
			continue
		}
		if i+1 == len(args) {
			t.Fatalf("harness.DindArgs: %s has no value", flag)
		}
		i++
		if flag == "--security-opt" && args[i] == "systempaths=unconfined" {
			// The docker CLI turns this into empty MaskedPaths and ReadonlyPaths; the API (and so
			// docker-compose v1) has no such security option. The inner engine (no bridge, no
			// iptables) starts without it.
			continue
		}
		key := map[string]string{"--cap-add": "cap_add", "--cap-drop": "cap_drop", "--security-opt": "security_opt",
			"--device-cgroup-rule": "device_cgroup_rules", "--tmpfs": "tmpfs", "-v": "volumes"}[flag]
		if key == "" {
			t.Fatalf("harness.DindArgs flag %s has no compose equivalent here: extend overrideFor", flag)
		}
		svc["privileged"] = false
		list, _ := svc[key].([]string)
		svc[key] = append(list, args[i])
	}
	doc := map[string]any{"version": "2.4", "services": map[string]any{service: svc}}
	data, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "override.yml")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestComposeExamples brings up both examples with docker-compose against the managed plugin:
// compose-dind.yml, whose volume compose creates from a golden through driver_opts and whose
// Docker-in-Docker engine then runs a container on it, and `down -v` removing the volume; and
// compose-external.yml, on a volume made beforehand, which `down -v` leaves alone.
func TestComposeExamples(t *testing.T) {
	hostOnly(t) // the guest has no docker-compose; the managed plugin on ZFS is TestManagedPluginZFS
	harness.RequireTools(t, "docker-compose")
	m := newManaged(t)
	buildPlugin(t, harness.Binary(t), m.name)
	m.enable(t, "ZGOLDEN_STORE_SIZE=8G")
	m.seedGolden(t, "prj_x") // the project the examples name
	examples := filepath.Join(repo(t), "examples")

	t.Run("dind", func(t *testing.T) {
		c := &compose{project: "zgc" + m.id, files: []string{filepath.Join(examples, "compose-dind.yml")}, env: []string{"ZGOLDEN_DRIVER=" + m.name}}
		c.override = overrideFor(t, "dind", harness.DindImage(), []string{"dind-dockerd"})
		vol := c.project + "_docker-data"
		m.live(t, vol)
		c.cleanup(t)
		c.run(t, "up", "--detach")

		if st := volumeStatus(t, vol); st["golden"] != "prj_x" {
			t.Fatalf("compose made %s with Status %v; want a clone of golden prj_x (driver_opts)", vol, st)
		}
		if got := c.run(t, "exec", "-T", "dind", "cat", "/var/lib/docker/README"); got != "golden content" {
			t.Fatalf("the service reads %q from the golden's README", got)
		}
		waitInnerDocker(t, c)
		c.run(t, "exec", "-T", "dind", "docker", "import", "/zgolden-images/busybox.tar", "inner:latest")
		if got := c.run(t, "exec", "-T", "dind", "docker", "run", "--rm", "--network", "none", "inner:latest", "echo", "inner-ok"); !strings.HasSuffix(got, "inner-ok") {
			t.Fatalf("the inner engine's container said %q", got)
		}

		c.run(t, "down", "--volumes", "--timeout", "5")
		c.down = true
		m.forget(vol)
		if n := adminVolumes(t, m); n != 0 {
			t.Fatalf("after docker-compose down --volumes zgolden still has %d volume(s)", n)
		}
	})

	t.Run("external", func(t *testing.T) {
		vol := m.volume(t, "session", "golden=prj_x", "size=120G")
		c := &compose{project: "zge" + m.id, files: []string{filepath.Join(examples, "compose-external.yml")}, env: []string{"SESSION=" + vol}}
		c.override = overrideFor(t, "dind", harness.DindImage(), []string{"sleep", "600"})
		c.cleanup(t)
		c.run(t, "up", "--detach")
		if got := c.run(t, "exec", "-T", "dind", "cat", "/var/lib/docker/README"); got != "golden content" {
			t.Fatalf("the service reads %q from the golden's README", got)
		}
		c.run(t, "down", "--volumes", "--timeout", "5")
		c.down = true
		if st := volumeStatus(t, vol); st["golden"] != "prj_x" || st["size"] != "120.0 GiB" {
			t.Fatalf("after down --volumes the external volume should be untouched: Status %v", st)
		}
		m.rmVolume(t, vol)
	})
}

// waitInnerDocker waits (bounded) for the Docker engine inside the compose service to answer.
func waitInnerDocker(t *testing.T, c *compose) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for {
		out, err := c.cmd("exec", "-T", "dind", "docker", "info", "--format", "{{.Driver}}")
		if err == nil && strings.TrimSpace(out) == "overlay2" {
			return
		}
		if time.Now().After(deadline) {
			logs, _ := c.cmd("logs", "--tail", "30")
			t.Fatalf("the inner dockerd never answered with overlay2: %v\n%s\n%s", err, out, logs)
		}
		time.Sleep(time.Second)
	}
}

// adminVolumes asks zgolden itself how many volumes it holds: asking Docker about a volume name
// it no longer knows makes it try every plugin it ever knew, which takes a minute.
func adminVolumes(t *testing.T, m *managed) int {
	t.Helper()
	var st struct{ Volumes int }
	out := m.admin(t, "status", "--json")
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("zgolden status --json: %v\n%s", err, out)
	}
	return st.Volumes
}
