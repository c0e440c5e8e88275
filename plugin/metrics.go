package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/zgolden/zgolden/driver"
)

// Metrics, for Prometheus (--metrics-listen). Operations are observed where every call enters,
// the volume API and the admin API; the state of volumes, space, spares and the pool is read from
// the driver at each scrape, so a metric never disagrees with `zgolden status`.

// opBuckets spans a reflink Create (about 15 ms) to Docker's 2-minute deadline and past it.
var opBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}

// metrics are the operation metrics; a nil *metrics observes nothing.
type metrics struct {
	reg      *prometheus.Registry
	duration *prometheus.HistogramVec
	errors   *prometheus.CounterVec
}

func newMetrics(d *driver.Driver, backend string) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "zgolden_operation_duration_seconds",
			Help:    "Time zgolden took for an operation (create, mount, unmount, remove, promote, import, reclaim, golden_remove), by result.",
			Buckets: opBuckets,
		}, []string{"op", "result"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "zgolden_operation_errors_total",
			Help: "Failed operations by kind (invalid, not_found, exists, busy, no_space, no_golden, has_dependents, import_running, generation_in_use, deadline, canceled, other).",
		}, []string{"op", "kind"}),
	}
	m.reg.MustRegister(m.duration, m.errors, &stateCollector{d: d, backend: backend},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// observe records one operation that started at start and ended with err.
func (m *metrics) observe(op string, start time.Time, err error) {
	if m == nil {
		return
	}
	result := "ok"
	if err != nil {
		result = "error"
		m.errors.WithLabelValues(op, driver.ErrorKind(err)).Inc()
	}
	m.duration.WithLabelValues(op, result).Observe(time.Since(start).Seconds())
}

// statusGauges are the gauges read from `zgolden status`. A field the backend does not report
// (ddt_entries on the reflink store) is left out of the scrape.
var statusGauges = []struct {
	name, help string
	get        func(driver.Status) (float64, bool)
}{
	{"zgolden_available_bytes", "Free bytes in the pool's parent dataset or the reflink store.",
		func(s driver.Status) (float64, bool) { return float64(s.AvailableBytes), true }},
	{"zgolden_used_bytes", "Bytes used by zgolden's parent dataset or the reflink store.",
		func(s driver.Status) (float64, bool) { return float64(s.UsedBytes), true }},
	{"zgolden_removals_pending", "Removed volumes whose space is not freed yet.",
		func(s driver.Status) (float64, bool) { return float64(s.RemovedPending), true }},
	{"zgolden_size_bytes", "Size of the reflink store's filesystem.",
		reflinkGauge(func(r *driver.ReflinkStatus) (float64, bool) { return float64(r.SizeBytes), true })},
	{"zgolden_host_available_bytes", "Free bytes on the host filesystem under a file-backed reflink store.",
		reflinkGauge(func(r *driver.ReflinkStatus) (float64, bool) { return deref(r.HostAvailableBytes) })},
	{"zgolden_ddt_entries", "Entries in the pool's dedup table; zgolden itself never makes any, so more than 0 means dedup=on somewhere in the pool.",
		zfsGauge(func(z *driver.ZFSStatus) (float64, bool) { return deref(z.DDTEntries) })},
	{"zgolden_spare_claims_pending", "Claimed spares whose claim is only in the local record yet (ZFS: not yet renamed to their volume's name; reflink: renamed, not yet synced).",
		func(s driver.Status) (float64, bool) { return float64(s.ClaimsPending), true }},
	{"zgolden_volumes_kept_mounted", "Volumes whose XFS zgolden keeps mounted until Remove, beside Docker's mountpoint and after Docker unmounts it, so that Unmount writes nothing.",
		func(s driver.Status) (float64, bool) { return float64(s.KeptMounted), true }},
	{"zgolden_devices_held", "Zvol devices held open from Unmount until Remove.",
		zfsGauge(func(z *driver.ZFSStatus) (float64, bool) { return float64(z.DevicesHeld), true })},
	{"zgolden_spares_making", "Spares the worker is making now.",
		zfsGauge(func(z *driver.ZFSStatus) (float64, bool) { return float64(z.SparesMaking), true })},
	{"zgolden_creates_waiting", "Creates that found no spare ready and wait for one being made rather than clone.",
		zfsGauge(func(z *driver.ZFSStatus) (float64, bool) { return float64(z.CreatesWaiting), true })},
	{"zgolden_cleanups_pending", "Timed-out Creates still being rolled back.",
		zfsGauge(func(z *driver.ZFSStatus) (float64, bool) { return float64(z.CleanupsPending), true })},
	{"zgolden_txg_sync_last_seconds", "How long the pool took to sync its last transaction group.",
		zfsGauge(func(z *driver.ZFSStatus) (float64, bool) { return deref(z.TxgSyncLastSeconds) })},
	{"zgolden_txg_sync_max10_seconds", "The longest sync of the pool's last 10 transaction groups.",
		zfsGauge(func(z *driver.ZFSStatus) (float64, bool) { return deref(z.TxgSyncMax10Seconds) })},
}

func zfsGauge(get func(*driver.ZFSStatus) (float64, bool)) func(driver.Status) (float64, bool) {
	return func(s driver.Status) (float64, bool) {
		if s.ZFSStatus == nil {
			return 0, false
		}
		return get(s.ZFSStatus)
	}
}

func reflinkGauge(get func(*driver.ReflinkStatus) (float64, bool)) func(driver.Status) (float64, bool) {
	return func(s driver.Status) (float64, bool) {
		if s.ReflinkStatus == nil {
			return 0, false
		}
		return get(s.ReflinkStatus)
	}
}

// deref reads an optional number of a status.
func deref[N uint64 | float64](n *N) (float64, bool) {
	if n == nil {
		return 0, false
	}
	return float64(*n), true
}

var (
	descUp = prometheus.NewDesc("zgolden_up",
		"1 when the backend answered the scrape's status query, 0 when it failed.", nil, nil)
	descBuild = prometheus.NewDesc("zgolden_build_info",
		"The running zgolden: version, Go version, backend and, on ZFS, the module and userland versions.",
		[]string{"version", "goversion", "backend", "zfs_module", "zfs_userland"}, nil)
	descVolumes = prometheus.NewDesc("zgolden_volumes",
		"Volumes by state (mounted: held by at least one container).", []string{"state"}, nil)
	descGenVolumes = prometheus.NewDesc("zgolden_generation_volumes",
		"Volumes cloned from each golden generation.", []string{"project", "generation"}, nil)
	descSpares = prometheus.NewDesc("zgolden_spares_ready",
		"Warm spare clones ready per project (--spares).", []string{"project"}, nil)
	statusDescs = func() map[string]*prometheus.Desc {
		out := map[string]*prometheus.Desc{}
		for _, g := range statusGauges {
			out[g.name] = prometheus.NewDesc(g.name, g.help, nil, nil)
		}
		return out
	}()
)

// stateCollector reads the driver's state at each scrape.
type stateCollector struct {
	d       *driver.Driver
	backend string
}

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descUp, descBuild, descVolumes, descGenVolumes, descSpares} {
		ch <- d
	}
	for _, d := range statusDescs {
		ch <- d
	}
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := c.d.Status(ctx)
	up := 1.0
	if err != nil {
		up = 0
	}
	ch <- prometheus.MustNewConstMetric(descUp, prometheus.GaugeValue, up)
	var module, userland string
	if st.ZFSStatus != nil {
		module, userland = st.ZFSModule, st.ZFSUserland
	}
	ch <- prometheus.MustNewConstMetric(descBuild, prometheus.GaugeValue, 1,
		version, runtime.Version(), c.backend, module, userland)
	for _, g := range statusGauges {
		if v, ok := g.get(st); ok && err == nil {
			ch <- prometheus.MustNewConstMetric(statusDescs[g.name], prometheus.GaugeValue, v)
		}
	}
	for project, n := range st.SparesReady {
		ch <- prometheus.MustNewConstMetric(descSpares, prometheus.GaugeValue, float64(n), project)
	}
	mounted, gens := 0, map[[2]string]int{}
	vols := c.d.List()
	for _, v := range vols {
		if v.Mounts > 0 {
			mounted++
		}
		if v.Golden != "" && v.Generation > 0 {
			gens[[2]string{v.Golden, strconv.Itoa(v.Generation)}]++
		}
	}
	ch <- prometheus.MustNewConstMetric(descVolumes, prometheus.GaugeValue, float64(mounted), "mounted")
	ch <- prometheus.MustNewConstMetric(descVolumes, prometheus.GaugeValue, float64(len(vols)-mounted), "unmounted")
	for k, n := range gens {
		ch <- prometheus.MustNewConstMetric(descGenVolumes, prometheus.GaugeValue, float64(n), k[0], k[1])
	}
}

// metricsListener listens on addr: "unix:PATH" (a 0600 socket, for the managed plugin, whose
// network is none) or a TCP address such as 127.0.0.1:9523.
func metricsListener(addr string) (net.Listener, error) {
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		return listenUnix(path)
	}
	return net.Listen("tcp", addr)
}

// metricsHandler serves /metrics and /healthz. /healthz answers 200 while the backend answers a
// status query within 5 seconds, and 503 with the error otherwise.
func metricsHandler(m *metrics, d *driver.Driver) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		defer cancel()
		if _, err := d.Status(ctx); err != nil {
			http.Error(w, "unhealthy: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	return mux
}

// validMetricsListen checks --metrics-listen before anything starts.
func validMetricsListen(addr string) error {
	if addr == "" {
		return nil
	}
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		if !strings.HasPrefix(path, "/") {
			return fmt.Errorf("--metrics-listen %q: a unix socket needs an absolute path (unix:/var/lib/zgolden/state/metrics.sock)", addr)
		}
		return nil
	}
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return fmt.Errorf("--metrics-listen %q: want HOST:PORT (127.0.0.1:9523) or unix:PATH: %v", addr, err)
	}
	return nil
}
