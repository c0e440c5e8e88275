package e2e

import (
	"encoding/json"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/zgolden/zgolden/tests/harness"
)

// TestSwarmPlacementByGoldenLabels runs a single-node swarm on this machine's engine: the
// plugin publishes the goldens it holds as node labels (--swarm-labels), a service whose
// constraint names its golden's label runs there with a zgolden volume cloned from that golden,
// a service constrained to a golden the node lacks stays pending, and the labels follow the
// goldens as they are promoted and removed, leaving the node's other labels alone.
func TestSwarmPlacementByGoldenLabels(t *testing.T) {
	requireNoSwarm(t)
	harness.DockerCmd(t, "swarm", "init", "--advertise-addr", "127.0.0.1", "--listen-addr", "127.0.0.1:2377")
	t.Cleanup(func() {
		if out, err := harness.Output("docker", "swarm", "leave", "--force"); err != nil {
			t.Errorf("cleanup: docker swarm leave: %v\n%s", err, out)
		}
	})
	harness.DockerCmd(t, "node", "update", "--label-add", "team=kept", harness.DockerCmd(t, "info", "--format", "{{.Swarm.NodeID}}"))

	const prefix = "zgtest"
	b := startBackend(t, "--swarm-labels", prefix)
	project := "svc_" + b.id
	b.importGolden(t, project)
	backend := map[bool]string{true: "zfs", false: "reflink"}[b.pool != ""]
	want := map[string]string{
		"team":                                   "kept",
		prefix + ".backend":                      backend,
		prefix + ".golden." + project:            "true",
		prefix + ".newest." + project:            "1",
		prefix + ".generation." + project + ".1": "true",
	}
	labels := waitLabels(t, localDocker, "self", prefix, want)
	if backend == "zfs" && labels[prefix+".guid."+project] == "" {
		t.Errorf("no guid label for the ZFS generation: %v", labels)
	}

	// A service placed by the golden's label gets a volume cloned from it on this node.
	vol, svc := b.n("zg-svc"), b.n("zg-svc")
	t.Cleanup(func() {
		_, _ = harness.Output("docker", "service", "rm", svc)
		waitGone(t, "label=com.docker.swarm.service.name="+svc)
		_, _ = harness.Output("docker", "volume", "rm", "-f", vol)
	})
	harness.DockerCmd(t, placedService(svc, vol, b.p.Name, prefix+".golden."+project, project)...)
	ctr := waitTask(t, localDocker, svc)
	if got := harness.DockerCmd(t, "exec", ctr, "cat", "/data/README"); got != "golden content" {
		t.Fatalf("the service's task reads %q from the golden's README", got)
	}
	if in := b.inspect(t, "zg-svc"); in.Status["golden"] != project || in.Status["generation"] != float64(1) {
		t.Fatalf("docker volume inspect of the service's volume = %+v", in)
	}

	// A service whose golden no node holds is not placed; Swarm says why.
	lost := b.n("zg-lost")
	t.Cleanup(func() { _, _ = harness.Output("docker", "service", "rm", lost) })
	harness.DockerCmd(t, placedService(lost, b.n("zg-lost"), b.p.Name, prefix+".golden.nothere", "nothere")...)
	var state string
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(time.Second) {
		state = harness.DockerCmd(t, "service", "ps", "--no-trunc", "--format", "{{.CurrentState}} | {{.Error}}", lost)
		if strings.Contains(state, "no suitable node") || time.Now().After(deadline) {
			break
		}
	}
	if !strings.HasPrefix(state, "Pending") || !strings.Contains(state, "no suitable node") {
		t.Errorf("a service constrained to a golden the node lacks: %q, want Pending with no suitable node", state)
	}
	if out, err := harness.Output("docker", "volume", "inspect", lost); err == nil {
		t.Errorf("the unplaced service's volume exists: %s", out)
	}

	// A promotion moves the newest label and adds the generation's; golden rm takes the
	// project's labels away and leaves the others.
	harness.DockerCmd(t, "service", "rm", svc)
	waitGone(t, "label=com.docker.swarm.service.name="+svc)
	if out, err := b.p.Admin(t, "golden", "promote", vol, "--project", project); err != nil {
		t.Fatalf("zgolden golden promote: %v\n%s", err, out)
	}
	want[prefix+".newest."+project] = "2"
	want[prefix+".generation."+project+".2"] = "true"
	// Generation 1 stays or is reclaimed, depending on whether the promoted volume still counts
	// on it; its label must say which.
	labels = waitLabels(t, localDocker, "self", prefix, want, prefix+".generation."+project+".1")
	out, err := b.p.Admin(t, "golden", "ls", "--json")
	var gs []struct {
		Project     string
		Generations []struct{ Number int }
	}
	if err != nil || json.Unmarshal([]byte(out), &gs) != nil {
		t.Fatalf("zgolden golden ls --json: %v\n%s", err, out)
	}
	has1 := false
	for _, g := range gs {
		for _, gen := range g.Generations {
			has1 = has1 || g.Project == project && gen.Number == 1
		}
	}
	if got := labels[prefix+".generation."+project+".1"] == "true"; got != has1 {
		t.Errorf("generation 1 labelled %v, but golden ls says it is held: %v", got, has1)
	}
	harness.DockerCmd(t, "volume", "rm", vol)
	if out, err := b.p.Admin(t, "golden", "rm", project); err != nil {
		t.Fatalf("zgolden golden rm: %v\n%s", err, out)
	}
	waitLabels(t, localDocker, "self", prefix, map[string]string{"team": "kept", prefix + ".backend": backend})

	out, err = b.p.Admin(t, "doctor")
	if !strings.Contains(out, "swarm labels") || !strings.Contains(out, prefix+".backend") {
		t.Errorf("zgolden doctor (err %v) says nothing of the published labels:\n%s", err, out)
	}
}

// requireNoSwarm skips a test that makes (or joins) a swarm and leaves it, unless this machine's
// engine is in none: leaving would take the engine out of a swarm it was in before.
func requireNoSwarm(t *testing.T) {
	t.Helper()
	harness.Docker(t)
	if state := strings.TrimSpace(harness.DockerCmd(t, "info", "--format", "{{.Swarm.LocalNodeState}}")); state != "inactive" {
		t.Skipf("this engine's swarm state is %q: the test makes and leaves a swarm of its own, so it needs an engine in none", state)
	}
}

// dockerOn runs docker against one engine and returns its output, failing the test on an error:
// localDocker for this machine's, or a manager's (managerEngine.docker).
type dockerOn func(t *testing.T, args ...string) string

func localDocker(t *testing.T, args ...string) string { return harness.DockerCmd(t, args...) }

// placedService is the argv of `docker service create` for a service svc that mounts volume vol
// of driver, cloned from golden, and may only run on a node whose label is true.
func placedService(svc, vol, driver, label, golden string) []string {
	return []string{"service", "create", "--detach", "--no-resolve-image", "--name", svc,
		"--restart-condition", "none", "--constraint", "node.labels." + label + "==true",
		"--mount", "type=volume,source=" + vol + ",destination=/data,volume-driver=" + driver + ",volume-opt=golden=" + golden,
		harness.BusyboxImage(), "sleep", "600"}
}

// waitLabels waits until node's labels, read through docker (a manager's engine, since only a
// manager can inspect nodes), but for the prefix's guid labels and the keys ignored, are exactly
// want, and returns them all.
func waitLabels(t *testing.T, docker dockerOn, node, prefix string, want map[string]string, ignore ...string) map[string]string {
	t.Helper()
	want = maps.Clone(want)
	for _, k := range ignore {
		delete(want, k)
	}
	var got map[string]string
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(500 * time.Millisecond) {
		raw := docker(t, "node", "inspect", node, "--format", "{{json .Spec.Labels}}")
		got = map[string]string{}
		if err := json.Unmarshal([]byte(raw), &got); err != nil {
			t.Fatalf("docker node inspect: %v: %s", err, raw)
		}
		cmp := maps.Clone(got)
		maps.DeleteFunc(cmp, func(k, _ string) bool { return strings.HasPrefix(k, prefix+".guid.") || slices.Contains(ignore, k) })
		if maps.Equal(cmp, want) {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("the node's labels are %v, want %v (and guid labels)", got, want)
		}
	}
}

// waitTask waits until the service's one task runs on this machine's engine and returns its
// container; docker reaches a manager, to say where the task is when it does not come.
func waitTask(t *testing.T, docker dockerOn, svc string) string {
	t.Helper()
	for deadline := time.Now().Add(3 * time.Minute); ; time.Sleep(time.Second) {
		if id := harness.DockerCmd(t, "ps", "-q", "--filter", "label=com.docker.swarm.service.name="+svc); id != "" {
			return id
		}
		if time.Now().After(deadline) {
			t.Fatalf("service %s has no running task after 3 minutes: %s", svc,
				docker(t, "service", "ps", "--no-trunc", "--format", "{{.Node}} {{.CurrentState}} | {{.Error}}", svc))
		}
	}
}

// waitGone waits until no container, running or not, matches filter.
func waitGone(t *testing.T, filter string) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
		if out, err := harness.Output("docker", "ps", "-aq", "--filter", filter); err == nil && strings.TrimSpace(out) == "" {
			return
		}
	}
	t.Errorf("containers matching %s still exist after a minute", filter)
}
