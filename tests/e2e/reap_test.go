package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/zgolden/zgolden/tests/harness"
)

type reaped struct {
	Volume  string `json:"volume"`
	Reason  string `json:"reason"`
	Removed bool   `json:"removed"`
	Error   string `json:"error"`
}

func reapNow(t *testing.T, p *harness.Plugin, args ...string) ([]reaped, error) {
	t.Helper()
	out, err := p.Admin(t, append([]string{"volume", "reap", "--json"}, args...)...)
	if err != nil {
		return nil, fmt.Errorf("%v: %s", err, out)
	}
	var rs []reaped
	if err := json.Unmarshal([]byte(out), &rs); err != nil {
		t.Fatalf("zgolden volume reap --json: %v\n%s", err, out)
	}
	return rs, nil
}

func names(rs []reaped) []string {
	var out []string
	for _, r := range rs {
		out = append(out, r.Volume)
	}
	slices.Sort(out)
	return out
}

// TestReapAbandonedVolumes: `zgolden volume reap` removes, through Docker, exactly the volumes no
// container (running or stopped) references; --dry-run lists them with the reason and removes
// nothing; a volume a stopped container still references stays, and so does one in use.
func TestReapAbandonedVolumes(t *testing.T) {
	p, _, _ := metricsPlugin(t)
	id := harness.ID()
	idle, stopped, running := "zr-idle-"+id, "zr-stopped-"+id, "zr-running-"+id
	for _, v := range []string{idle, stopped, running} {
		harness.DockerCmd(t, "volume", "create", "--driver", p.Name, v)
	}
	t.Cleanup(func() {
		for _, c := range []string{"zr-c1-" + id, "zr-c2-" + id} {
			_, _ = harness.Output("docker", "rm", "-f", c)
		}
		// Through Docker only the volumes it still knows: asking it for a gone name makes it
		// try every volume driver it has seen, dead test plugins too, for seconds each.
		for _, v := range []string{stopped, running} {
			_, _ = harness.Output("docker", "volume", "rm", "-f", v)
		}
		_ = pluginCall(t, p.Socket, "/VolumeDriver.Remove", map[string]string{"Name": idle})
	})
	harness.DockerCmd(t, "run", "--name", "zr-c1-"+id, "--network", "none", "-v", stopped+":/data", harness.BusyboxImage(), "true")
	harness.DockerCmd(t, "run", "-d", "--name", "zr-c2-"+id, "--network", "none", "-v", running+":/data", harness.BusyboxImage(), "sleep", "300")
	time.Sleep(1500 * time.Millisecond)

	rs, err := reapNow(t, p, "--after", "1s", "--dry-run")
	if err != nil {
		t.Fatal(err)
	}
	if got := names(rs); !slices.Equal(got, []string{idle}) || rs[0].Removed || !strings.Contains(rs[0].Reason, "no container has referenced it") {
		t.Fatalf("reap --dry-run = %+v; want only %s, not removed, with its reason", rs, idle)
	}
	if ls := harness.DockerCmd(t, "volume", "ls", "-q", "--filter", "driver="+p.Name); !strings.Contains(ls, idle) {
		t.Fatalf("--dry-run removed %s", idle)
	}
	rs, err = reapNow(t, p, "--after", "1s")
	if err != nil {
		t.Fatal(err)
	}
	if got := names(rs); !slices.Equal(got, []string{idle}) || !rs[0].Removed {
		t.Fatalf("reap = %+v; want %s removed", rs, idle)
	}
	ls := harness.DockerCmd(t, "volume", "ls", "-q", "--filter", "driver="+p.Name)
	if strings.Contains(ls, idle) || !strings.Contains(ls, stopped) || !strings.Contains(ls, running) {
		t.Fatalf("after the reap docker volume ls =\n%s\nwant %s gone and %s, %s kept", ls, idle, stopped, running)
	}
	if !strings.Contains(p.Logs(), "reaped a volume no container had used") {
		t.Error("the reap is not in the plugin's log")
	}

	// A busy error names the containers Docker lists for the volume: the plugin's own Remove of
	// the running container's volume (Docker itself refuses before it asks the plugin).
	err = pluginCall(t, p.Socket, "/VolumeDriver.Remove", map[string]string{"Name": running})
	if err == nil || !strings.Contains(err.Error(), "zr-c2-"+id+" (running)") {
		t.Errorf("Remove of a volume a running container holds: %v; want the container named", err)
	}
}

// TestReapWithoutDocker: while the Docker engine cannot be reached, nothing is reaped, and the
// command says why.
func TestReapWithoutDocker(t *testing.T) {
	t.Setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
	p, _, _ := metricsPlugin(t)
	v := "zr-nodocker-" + harness.ID()
	if err := pluginCall(t, p.Socket, "/VolumeDriver.Create", map[string]any{"Name": v}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pluginCall(t, p.Socket, "/VolumeDriver.Remove", map[string]string{"Name": v}) })
	time.Sleep(1500 * time.Millisecond)
	if _, err := reapNow(t, p, "--after", "1s"); err == nil || !strings.Contains(err.Error(), "nothing is reaped") {
		t.Fatalf("reap without Docker: %v; want a refusal saying nothing is reaped", err)
	}
	var list struct{ Volumes []struct{ Name string } }
	if err := pluginCallOut(t, p.Socket, "/VolumeDriver.List", struct{}{}, &list); err != nil || len(list.Volumes) != 1 {
		t.Fatalf("after the refused reap the plugin lists %+v (%v); want %s kept", list, err, v)
	}
}

// pluginCall posts req to the plugin's Docker socket and returns its Err, as Docker would see it.
func pluginCall(t *testing.T, socket, path string, req any) error {
	return pluginCallOut(t, socket, path, req, nil)
}

func pluginCallOut(t *testing.T, socket, path string, req, out any) error {
	t.Helper()
	c := &http.Client{Timeout: 2 * time.Minute, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", socket)
		},
	}}
	body, _ := json.Marshal(req)
	resp, err := c.Post("http://plugin"+path, "application/vnd.docker.plugins.v1+json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var raw json.RawMessage
	if err := json.NewDecoder(resp.Body).Decode(&raw); err != nil {
		t.Fatal(err)
	}
	var e struct{ Err string }
	_ = json.Unmarshal(raw, &e)
	if e.Err != "" {
		return &pluginErr{e.Err}
	}
	if out != nil {
		return json.Unmarshal(raw, out)
	}
	return nil
}

type pluginErr struct{ msg string }

func (e *pluginErr) Error() string { return e.msg }
