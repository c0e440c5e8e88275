package stress

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"
	"github.com/sirupsen/logrus"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/tests/harness"
)

// limits bounds a run in operations and in time, whichever comes first. The defaults finish in
// about a minute per phase on the host; the emulated guest gets more time and does fewer
// operations in it, which the log reports.
type limits struct {
	ops     int
	dur     time.Duration
	workers int
	names   int
}

func envInt(key string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(key)); err == nil && v > 0 {
		return v
	}
	return def
}

func loadLimits(opsKey string, defOps int) limits {
	dur := 40 * time.Second
	if harness.InGuest() {
		// Under emulation a ZFS operation takes a tenth of a second or more: the guest runs for
		// longer, long enough for a couple of thousand operations a phase (about 13 a second
		// were measured), which the log reports.
		dur = 150 * time.Second
	}
	if d, err := time.ParseDuration(os.Getenv("ZGOLDEN_STRESS_TIME")); err == nil && d > 0 {
		dur = d
	}
	return limits{
		ops: envInt(opsKey, defOps), dur: dur,
		workers: envInt("ZGOLDEN_STRESS_WORKERS", 8), names: envInt("ZGOLDEN_STRESS_NAMES", 6),
	}
}

var projects = []string{"sp0", "sp1"}

// op is one kind of call with its weight in the random mix.
type op struct {
	name   string
	weight int
}

var mix = []op{
	{"create", 20}, {"mount", 16}, {"unmount", 22}, {"remove", 14}, {"get", 12},
	{"list", 8}, {"path", 4}, {"promote", 3}, {"reclaim", 1},
}

// stats counts outcomes per call and error kind; violations are outcomes no correct driver
// could produce under this workload.
type stats struct {
	mu         sync.Mutex
	outcomes   map[string]int
	violations []string
	total      atomic.Int64
}

func (s *stats) add(call, kind string) {
	if kind == "" {
		kind = "ok"
	}
	s.mu.Lock()
	s.outcomes[call+" "+kind]++
	s.mu.Unlock()
}

func (s *stats) violate(format string, a ...any) {
	s.mu.Lock()
	s.violations = append(s.violations, fmt.Sprintf(format, a...))
	s.mu.Unlock()
}

func (s *stats) summary() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	keys := make([]string, 0, len(s.outcomes))
	for k := range s.outcomes {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, " %s=%d", strings.ReplaceAll(k, " ", ":"), s.outcomes[k])
	}
	return b.String()
}

// worker is one goroutine of the workload. It mounts only with its own IDs, so it knows exactly
// which holds are its own: the sum over workers is what the driver's refcounts must say.
type worker struct {
	n         int
	c         client
	mountRoot string
	names     []string
	st        *stats
	rnd       *rand.Rand
	held      map[string]map[string]bool // volume -> this worker's mount IDs on it
}

func (w *worker) pick() string {
	total := 0
	for _, o := range mix {
		total += o.weight
	}
	r := w.rnd.IntN(total)
	for _, o := range mix {
		if r < o.weight {
			return o.name
		}
		r -= o.weight
	}
	return mix[0].name
}

// allowed lists the error kinds each call may legitimately return under this workload.
var allowed = map[string][]string{
	"create":  {"", "exists"},
	"remove":  {"", "busy"},
	"mount":   {"", "notfound"},
	"unmount": {""},
	"get":     {"", "notfound"},
	"list":    {""},
	"path":    {"", "notfound"},
	"promote": {"", "notfound"},
	"reclaim": {""},
}

func (w *worker) step() {
	call := w.pick()
	name := w.names[w.rnd.IntN(len(w.names))]
	if call == "unmount" && w.rnd.IntN(4) > 0 {
		// Mostly release a hold this worker has, so volumes keep being freed and removed
		// rather than piling up mount references.
		for n, ids := range w.held {
			if len(ids) > 0 {
				name = n
				break
			}
		}
	}
	var err error
	switch call {
	case "create":
		opts := map[string]string{}
		switch w.rnd.IntN(3) {
		case 1:
			opts["golden"] = projects[0]
		case 2:
			opts["golden"] = projects[1]
		}
		err = w.c.Create(name, opts)
		// A Create racing a reclaim can pick a generation the reclaim then destroys; it is a
		// retryable error, counted apart (see the report), not a corruption.
		if opts["golden"] != "" && errKind(err) == "notfound" {
			w.st.add(call, "generation-vanished")
			return
		}
	case "mount":
		id := fmt.Sprintf("w%d-%d", w.n, w.rnd.IntN(2))
		var mp string
		mp, err = w.c.Mount(name, id)
		if err == nil {
			if w.held[name] == nil {
				w.held[name] = map[string]bool{}
			}
			w.held[name][id] = true
			w.useMount(name, mp)
		}
	case "unmount":
		id := fmt.Sprintf("w%d-%d", w.n, w.rnd.IntN(2))
		for held := range w.held[name] { // prefer a hold this worker has
			id = held
			break
		}
		err = w.c.Unmount(name, id)
		if err == nil {
			delete(w.held[name], id)
		}
	case "remove":
		err = w.c.Remove(name)
		if err == nil && len(w.held[name]) > 0 {
			w.st.violate("Remove(%s) succeeded while worker %d holds it with %v", name, w.n, w.held[name])
			delete(w.held, name)
		}
	case "get":
		var v vol
		v, err = w.c.Get(name)
		if err == nil && v.mounts < len(w.held[name]) {
			w.st.violate("Get(%s) reports %d mounts while worker %d alone holds %d", name, v.mounts, w.n, len(w.held[name]))
		}
		if errKind(err) == "notfound" && len(w.held[name]) > 0 {
			w.st.violate("Get(%s) says not found while worker %d holds it", name, w.n)
		}
	case "list":
		var vs []vol
		vs, err = w.c.List()
		seen := map[string]bool{}
		for _, v := range vs {
			if seen[v.name] {
				w.st.violate("List returned %s twice", v.name)
			}
			seen[v.name] = true
		}
		for n, ids := range w.held {
			if len(ids) > 0 && !seen[n] {
				w.st.violate("List lacks %s, which worker %d holds", n, w.n)
			}
		}
	case "path":
		var p string
		p, err = w.c.Path(name)
		if err == nil && len(w.held[name]) > 0 && p != filepath.Join(w.mountRoot, name) {
			w.st.violate("Path(%s) = %q while worker %d holds it mounted", name, p, w.n)
		}
	case "promote":
		err = w.c.Promote(name, projects[w.rnd.IntN(len(projects))])
	case "reclaim":
		err = w.c.Reclaim(projects[w.rnd.IntN(len(projects))])
	}
	kind := errKind(err)
	w.st.add(call, kind)
	if !slices.Contains(allowed[call], kind) {
		w.st.violate("%s(%s) by worker %d: unexpected error: %v", call, name, w.n, err)
	}
}

// useMount proves a mount is real while the workload races: the mountpoint is in the kernel's
// mount table and takes a write that reads back.
func (w *worker) useMount(name, mp string) {
	if want := filepath.Join(w.mountRoot, name); mp != want {
		w.st.violate("Mount(%s) returned %q, want %q", name, mp, want)
		return
	}
	if ok, err := mountinfo.Mounted(mp); err != nil || !ok {
		w.st.violate("Mount(%s) succeeded but %s is not a mountpoint (%v)", name, mp, err)
		return
	}
	f := filepath.Join(mp, fmt.Sprintf("w%d", w.n))
	data := []byte(fmt.Sprintf("worker %d\n", w.n))
	if err := os.WriteFile(f, data, 0o644); err != nil {
		w.st.violate("write in mounted %s: %v", name, err)
		return
	}
	if got, err := os.ReadFile(f); err != nil || string(got) != string(data) {
		w.st.violate("read back in mounted %s: %q, %v", name, got, err)
	}
}

// race runs the workload until the operation count or the time bound is reached, and returns
// the workers (with their holds) and the stats.
func race(t *testing.T, c client, mountRoot string, lim limits) ([]*worker, *stats) {
	t.Helper()
	names := make([]string, lim.names)
	for i := range names {
		names[i] = fmt.Sprintf("s%d", i)
	}
	st := &stats{outcomes: map[string]int{}}
	deadline := time.Now().Add(lim.dur)
	seed := uint64(time.Now().UnixNano())
	t.Logf("random seed %d", seed)
	workers := make([]*worker, lim.workers)
	var wg sync.WaitGroup
	for i := range workers {
		w := &worker{n: i, c: c, mountRoot: mountRoot, names: names, st: st,
			rnd: rand.New(rand.NewPCG(seed, uint64(i))), held: map[string]map[string]bool{}}
		workers[i] = w
		wg.Add(1)
		go func() {
			defer wg.Done()
			for st.total.Add(1) <= int64(lim.ops) && time.Now().Before(deadline) {
				w.step()
			}
		}()
	}
	wg.Wait()
	return workers, st
}

// holds sums the workers' mount IDs per volume.
func holds(workers []*worker) map[string]int {
	out := map[string]int{}
	for _, w := range workers {
		for n, ids := range w.held {
			if len(ids) > 0 {
				out[n] += len(ids)
			}
		}
	}
	return out
}

// snapshot is the client's quiescent view: every volume with its mount count from Get.
func snapshot(t *testing.T, c client) []vol {
	t.Helper()
	ls, err := c.List()
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	out := make([]vol, 0, len(ls))
	for _, v := range ls {
		g, err := c.Get(v.name)
		if err != nil {
			t.Fatalf("Get(%s), listed: %v", v.name, err)
		}
		out = append(out, g)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

// checkQuiescent asserts the invariants once the workload has stopped: refcounts equal the
// workers' holds, the mount table matches them, and the backend holds exactly what is listed.
func checkQuiescent(t *testing.T, phase string, c client, b *backend, mountRoot string, want map[string]int) []vol {
	t.Helper()
	vols := snapshot(t, c)
	var wantMounts []string
	for _, v := range vols {
		if v.mounts != want[v.name] {
			t.Errorf("%s: %s has %d mount references; the workers hold %d", phase, v.name, v.mounts, want[v.name])
		}
		if v.mounts > 0 {
			wantMounts = append(wantMounts, filepath.Join(mountRoot, v.name))
		}
	}
	for n, k := range want {
		if !slices.ContainsFunc(vols, func(v vol) bool { return v.name == n }) {
			t.Errorf("%s: the workers hold %s %d times but it is not listed", phase, n, k)
		}
	}
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(mountRoot))
	if err != nil {
		t.Fatal(err)
	}
	var gotMounts []string
	for _, m := range ms {
		gotMounts = append(gotMounts, m.Mountpoint)
	}
	slices.Sort(gotMounts)
	if !slices.Equal(gotMounts, wantMounts) {
		t.Errorf("%s: mounted %v; the references say %v", phase, gotMounts, wantMounts)
	}
	gs, err := c.Goldens()
	if err != nil {
		t.Fatalf("Goldens: %v", err)
	}
	got, exp := b.inventory(t), b.expected(t, vols, gs)
	if l := minus(got, exp); len(l) > 0 {
		t.Errorf("%s: the backend holds objects nothing lists (leaked): %v", phase, l)
	}
	if l := minus(exp, got); len(l) > 0 {
		t.Errorf("%s: listed but missing from the backend: %v", phase, l)
	}
	return vols
}

// finish proves every listed volume and generation usable, then releases and removes everything
// and checks that nothing is left: no object, no mount, no loop device.
func finish(t *testing.T, c client, b *backend, mountRoot string, workers []*worker, vols []vol, baseline []string) {
	t.Helper()
	for _, v := range vols {
		mp, err := c.Mount(v.name, "final-check")
		if err != nil {
			t.Errorf("%s is listed but does not mount: %v", v.name, err)
			continue
		}
		f := filepath.Join(mp, "final-check")
		if err := os.WriteFile(f, []byte("ok"), 0o644); err != nil {
			t.Errorf("%s mounts but takes no write: %v", v.name, err)
		}
		if err := c.Unmount(v.name, "final-check"); err != nil {
			t.Errorf("unmount %s: %v", v.name, err)
		}
	}
	gs, err := c.Goldens()
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range gs {
		if newest := g.Newest(); newest != nil {
			name := "clone-" + g.Project
			if err := c.Create(name, map[string]string{"golden": g.Project}); err != nil {
				t.Errorf("golden %s (generation %d) does not clone: %v", g.Project, newest.Number, err)
				continue
			}
			if _, err := c.Mount(name, "final-check"); err != nil {
				t.Errorf("a clone of golden %s does not mount: %v", g.Project, err)
			} else if err := c.Unmount(name, "final-check"); err != nil {
				t.Errorf("unmount the clone of %s: %v", g.Project, err)
			}
			if err := c.Remove(name); err != nil {
				t.Errorf("remove the clone of %s: %v", g.Project, err)
			}
		}
	}
	for _, w := range workers {
		for name, ids := range w.held {
			for id := range ids {
				if err := c.Unmount(name, id); err != nil {
					t.Errorf("release %s held by %s: %v", name, id, err)
				}
			}
		}
	}
	for _, v := range vols {
		if err := c.Remove(v.name); err != nil {
			t.Errorf("remove %s after every hold was released: %v", v.name, err)
		}
	}
	for _, g := range gs {
		if err := c.RemoveGolden(g.Project); err != nil {
			t.Errorf("remove golden %s: %v", g.Project, err)
		}
	}
	if left, _ := c.List(); len(left) > 0 {
		t.Errorf("volumes left after removing everything: %v", left)
	}
	if after := b.inventory(t); !slices.Equal(after, baseline) {
		t.Errorf("after removing everything the backend holds %v; it held %v before the workload", after, baseline)
	}
	harness.SparesGone(t, b.where(), func() []string { return b.inventoryAll(t) })
	if ms, _ := mountinfo.GetMounts(mountinfo.PrefixFilter(mountRoot)); len(ms) > 0 {
		t.Errorf("still mounted after removing everything: %d mounts under %s", len(ms), mountRoot)
	}
}

func report(t *testing.T, how string, b *backend, lim limits, st *stats, took time.Duration) {
	t.Helper()
	n := min(st.total.Load()-int64(lim.workers), int64(lim.ops)) // each worker's last Add stopped it
	t.Logf("stress (%s, %s backend): %d operations in %s by %d goroutines over %d names:%s",
		how, b.kind, n, took.Round(time.Second), lim.workers, lim.names, st.summary())
	for i, v := range st.violations {
		if i == 30 {
			t.Errorf("... and %d more violations", len(st.violations)-30)
			break
		}
		t.Errorf("violation: %s", v)
	}
}

func newLog(t *testing.T) *logrus.Entry {
	l := logrus.New()
	l.SetLevel(logrus.ErrorLevel) // thousands of calls: only what went wrong
	l.SetOutput(testWriter{t})
	return logrus.NewEntry(l)
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// TestStressDriver races the workload against driver.New on the real store, in-process, so the
// race detector sees every lock of the driver and the backend. Afterwards it checks the
// invariants, restarts (a new driver and store on the same storage, as after kill -9) and checks
// them again, then proves everything usable and removes it all without a leak.
func TestStressDriver(t *testing.T) {
	b := newBackend(t)
	state := t.TempDir()
	mountRoot := filepath.Join(state, "mnt")
	log := newLog(t)
	var stores []driver.Backend
	open := func() *driver.Driver {
		s := b.open(t, log)
		stores = append(stores, s)
		d, err := driver.New(t.Context(), driver.Config{
			Backend: s, MountRoot: mountRoot, StateDir: filepath.Join(state, "state"),
			DefaultSize: 1 << 30, ImportWait: 5 * time.Second, Log: log,
		})
		if err != nil {
			t.Fatalf("driver.New: %v", err)
		}
		return d
	}
	t.Cleanup(func() {
		// The reflink store file stays mounted until the store is closed, as an uninstaller would.
		for i := len(stores) - 1; i >= 0; i-- {
			if c, ok := stores[i].(interface{ Close(context.Context) error }); ok {
				if err := c.Close(context.Background()); err != nil && !t.Failed() {
					t.Errorf("close the store: %v", err)
				}
			}
		}
	})
	d := open()
	baseline := b.inventory(t)
	lim := loadLimits("ZGOLDEN_STRESS_OPS", 6000)
	start := time.Now()
	workers, st := race(t, driverClient{d}, mountRoot, lim)
	report(t, "driver API", b, lim, st, time.Since(start))

	want := holds(workers)
	before := checkQuiescent(t, "after the workload", driverClient{d}, b, mountRoot, want)
	d = open() // a restart: nothing closed first, as after kill -9
	after := checkQuiescent(t, "after a restart", driverClient{d}, b, mountRoot, want)
	if !slices.Equal(before, after) {
		t.Errorf("a restart changed the volumes: %v before, %v after", before, after)
	}
	finish(t, driverClient{d}, b, mountRoot, workers, after, baseline)
}

// TestStressPluginSockets races the workload against the running plugin through its sockets, as
// Docker (the volume protocol) and the zgolden command line (the admin API) talk to it, kills it
// with SIGKILL, restarts it, and checks the same invariants.
func TestStressPluginSockets(t *testing.T) {
	b := newBackend(t)
	// The workers mount through the volume protocol as Docker would, but they are no containers
	// Docker knows: a plugin that could ask Docker would rightly find their references stale
	// after the restart and drop them (driver.go, "Mount references a crash inside Unmount
	// left"). So this plugin has no Docker to ask, and keeps every reference, which is what the
	// test checks; tests/e2e's TestRestartWithMountedVolumes holds a real container's across a
	// kill -9 with Docker there.
	t.Setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
	p := harness.StartPlugin(t, pluginName, b.pluginArgs()...)
	c := newSocketClient(p)
	baseline := b.inventory(t)
	lim := loadLimits("ZGOLDEN_STRESS_SOCKET_OPS", 3000)
	start := time.Now()
	workers, st := race(t, c, p.MountRoot, lim)
	report(t, "plugin sockets", b, lim, st, time.Since(start))

	want := holds(workers)
	before := checkQuiescent(t, "after the workload", c, b, p.MountRoot, want)
	p.Stop(syscall.SIGKILL)
	p.Start()
	after := checkQuiescent(t, "after kill -9 and a restart", c, b, p.MountRoot, want)
	if !slices.Equal(before, after) {
		t.Errorf("a restart changed the volumes: %v before, %v after", before, after)
	}
	finish(t, c, b, p.MountRoot, workers, after, baseline)
}
