package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/zgolden/zgolden/tests/harness"
)

// freeAddr is a TCP address on 127.0.0.1 that nothing listens on right now.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// metricsPlugin starts the plugin on this machine's backend with --metrics-listen (and extra)
// and returns it with the address it serves metrics on, and the backend's name.
func metricsPlugin(t *testing.T, extra ...string) (*harness.Plugin, string, string) {
	t.Helper()
	harness.Docker(t)
	addr := freeAddr(t)
	extra = append(extra, "--metrics-listen", addr)
	if os.Getenv("ZGOLDEN_TEST_ZPOOL") != "" {
		return harness.StartPlugin(t, pluginName, append([]string{"--backend", "zfs", "--parent", harness.ZFSParent(t)}, extra...)...), addr, "zfs"
	}
	root, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	root = filepath.Join(root, "root")
	t.Cleanup(func() { _, _ = harness.Output("umount", filepath.Join(root, "store")) })
	return harness.StartPlugin(t, pluginName, append([]string{"--backend", "reflink", "--root", root, "--store-size", "8G"}, extra...)...), addr, "reflink"
}

// sessionLifecycle creates, mounts (a container writes), unmounts and removes one volume through
// Docker, and tries one Create Docker must refuse; it returns the volume's name.
func sessionLifecycle(t *testing.T, p *harness.Plugin) string {
	t.Helper()
	name := "zm" + harness.ID()
	harness.DockerCmd(t, "volume", "create", "--driver", p.Name, name)
	harness.DockerCmd(t, "run", "--rm", "--network", "none", "-v", name+":/data", harness.BusyboxImage(), "sh", "-c", "echo hi > /data/f")
	harness.DockerCmd(t, "volume", "rm", name)
	if out, err := harness.Output("docker", "volume", "create", "--driver", p.Name, "-o", "dedup=on", name+"x"); err == nil {
		t.Fatalf("docker volume create -o dedup=on succeeded: %s", out)
	}
	return name
}

func scrape(t *testing.T, addr string) (string, map[string]*dto.MetricFamily) {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %s, %v", resp.Status, err)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		t.Fatalf("the metrics do not parse: %v\n%s", err, body)
	}
	return string(body), fams
}

// value is the value of the series of family name whose labels include want, or -1.
func value(fams map[string]*dto.MetricFamily, name string, want map[string]string) float64 {
	f := fams[name]
	if f == nil {
		return -1
	}
series:
	for _, m := range f.GetMetric() {
		labels := map[string]string{}
		for _, l := range m.GetLabel() {
			labels[l.GetName()] = l.GetValue()
		}
		for k, v := range want {
			if labels[k] != v {
				continue series
			}
		}
		switch {
		case m.Gauge != nil:
			return m.GetGauge().GetValue()
		case m.Counter != nil:
			return m.GetCounter().GetValue()
		case m.Histogram != nil:
			return float64(m.GetHistogram().GetSampleCount())
		}
	}
	return -1
}

// TestMetrics: with --metrics-listen the plugin serves Prometheus metrics that count what Docker
// did through it (each operation's latency by result, errors by kind), the backend's space and
// state, and a /healthz; promtool, where installed, finds nothing to lint in them.
func TestMetrics(t *testing.T) {
	p, addr, backend := metricsPlugin(t)
	sessionLifecycle(t, p)
	body, fams := scrape(t, addr)
	for _, op := range []string{"create", "mount", "unmount", "remove"} {
		if n := value(fams, "zgolden_operation_duration_seconds", map[string]string{"op": op, "result": "ok"}); n < 1 {
			t.Errorf("zgolden_operation_duration_seconds{op=%q,result=\"ok\"} count = %v, want >= 1", op, n)
		}
	}
	if n := value(fams, "zgolden_operation_errors_total", map[string]string{"op": "create", "kind": "invalid"}); n != 1 {
		t.Errorf("zgolden_operation_errors_total{op=\"create\",kind=\"invalid\"} = %v, want 1 (the -o dedup=on Create)", n)
	}
	if v := value(fams, "zgolden_up", nil); v != 1 {
		t.Errorf("zgolden_up = %v, want 1", v)
	}
	if v := value(fams, "zgolden_build_info", map[string]string{"backend": backend}); v != 1 {
		t.Errorf("zgolden_build_info{backend=%q} = %v, want 1", backend, v)
	}
	if v := value(fams, "zgolden_available_bytes", nil); v <= 0 {
		t.Errorf("zgolden_available_bytes = %v, want > 0", v)
	}
	if v := value(fams, "zgolden_volumes", map[string]string{"state": "mounted"}); v != 0 {
		t.Errorf("zgolden_volumes{state=\"mounted\"} = %v after the container exited, want 0", v)
	}
	if backend == "zfs" {
		if v := value(fams, "zgolden_ddt_entries", nil); v != 0 {
			t.Errorf("zgolden_ddt_entries = %v, want 0 (zgolden never dedups)", v)
		}
		if v := value(fams, "zgolden_txg_sync_last_seconds", nil); v < 0 {
			t.Error("no zgolden_txg_sync_last_seconds on ZFS")
		}
	}
	resp, err := http.Get("http://" + addr + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	hb, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || strings.TrimSpace(string(hb)) != "ok" {
		t.Errorf("GET /healthz = %s %q, want 200 ok", resp.Status, hb)
	}
	if _, err := exec.LookPath("promtool"); err == nil {
		cmd := exec.Command("promtool", "check", "metrics")
		cmd.Stdin = strings.NewReader(body)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("promtool check metrics: %v\n%s", err, out)
		}
	} else {
		t.Log("promtool is not installed here: the lint runs where it is (the host)")
	}
}

// TestPrometheusScrapes: a real Prometheus (Debian's) scrapes a running zgolden, and the series
// come back from its query API.
func TestPrometheusScrapes(t *testing.T) {
	harness.RequireRoot(t)
	harness.RequireTools(t, "prometheus")
	p, addr, _ := metricsPlugin(t)
	sessionLifecycle(t, p)

	dir := t.TempDir()
	cfg := fmt.Sprintf("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: zgolden\n    static_configs:\n      - targets: [%q]\n", addr)
	if err := os.WriteFile(filepath.Join(dir, "prometheus.yml"), []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	web := freeAddr(t)
	cmd := exec.Command("prometheus", "--config.file="+filepath.Join(dir, "prometheus.yml"),
		"--storage.tsdb.path="+filepath.Join(dir, "data"), "--web.listen-address="+web)
	var logs strings.Builder
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })

	query := `zgolden_operation_duration_seconds_count{job="zgolden",op="create",result="ok"}`
	var last string
	for deadline := time.Now().Add(90 * time.Second); time.Now().Before(deadline); time.Sleep(time.Second) {
		resp, err := http.Get("http://" + web + "/api/v1/query?query=" + url.QueryEscape(query))
		if err != nil {
			last = err.Error()
			continue
		}
		var out struct {
			Status string `json:"status"`
			Data   struct {
				Result []struct {
					Value [2]any `json:"value"`
				} `json:"result"`
			} `json:"data"`
		}
		err = json.NewDecoder(resp.Body).Decode(&out)
		resp.Body.Close()
		if err == nil && out.Status == "success" && len(out.Data.Result) == 1 {
			s, _ := out.Data.Result[0].Value[1].(string)
			if n, _ := strconv.ParseFloat(s, 64); n >= 1 {
				return
			}
		}
		last = fmt.Sprintf("%+v (%v)", out, err)
	}
	t.Fatalf("Prometheus never returned %s >= 1; last answer %s\nprometheus log:\n%s", query, last, logs.String())
}
