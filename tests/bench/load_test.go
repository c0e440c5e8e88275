package bench

import (
	"bufio"
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/zgolden/zgolden/zfsutil"
)

// ---- case: a busy pool --------------------------------------------------------------------
//
// load times Create+Mount, Unmount (of a volume that has written) and Remove through the plugin,
// and the raw sequence (clone + device + mount; umount; destroy), on an idle pool and then while
// LoadWriters session volumes write continuously: sequential 1 MiB writes with an fsync, mixed
// with random 4-8 KiB overwrites, the way a docker build writes. ZFS admin commands wait for a
// transaction group to sync, and under that load a group carries up to zfs_dirty_data_max of
// dirty data: this case is where that shows. It also records the writers' throughput with and
// without the Creates, and the pool's txg sync times during each phase.

// loadSettings are the case's knobs: ZGOLDEN_BENCH_LOAD_WRITERS (default 4) and
// ZGOLDEN_BENCH_LOAD_REPS (samples per method and phase; default 5, 3 in the guest, where one
// raw clone under load took up to two minutes).
func loadSettings(t *testing.T, guest bool) (writers, reps int) {
	writers, reps = 4, 5
	if guest {
		reps = 3
	}
	for _, kv := range []struct {
		env string
		p   *int
	}{{"ZGOLDEN_BENCH_LOAD_WRITERS", &writers}, {"ZGOLDEN_BENCH_LOAD_REPS", &reps}} {
		if v := os.Getenv(kv.env); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 {
				t.Fatalf("%s=%q: want a positive count", kv.env, v)
			}
			*kv.p = n
		}
	}
	return writers, reps
}

// loadWriters writes into the session volumes mounted at dirs until stopped, counting bytes.
//
// Each session is a process of its own, as sessions are: this test binary run again with
// writerEnv set (TestMain). Writers as goroutines of the bench's own process would compete with
// the timed calls' client for the Go runtime's processors: while every processor sat in a
// writer's long write system call, the client waits for the runtime to take one back, time the
// plugin never sees. Sessions are separate processes, and so is dockerd.
type loadWriters struct {
	wg       sync.WaitGroup
	written  atomic.Int64
	stopping atomic.Bool
	cmds     []*exec.Cmd
	firstMu  sync.Mutex
	first    error
}

const writerEnv = "ZGOLDEN_BENCH_WRITER" // DIR:SEED: this process is a load writer

func TestMain(m *testing.M) {
	if v := os.Getenv(writerEnv); v != "" {
		os.Exit(writerMain(v))
	}
	os.Exit(m.Run())
}

// writerMain is a writer process: it writes until SIGTERM, printing the bytes written so far
// after each round.
func writerMain(v string) int {
	dir, seedStr, _ := strings.Cut(v, ":")
	seed, _ := strconv.ParseUint(seedStr, 10, 64)
	stop := make(chan struct{})
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM)
	go func() { <-sig; close(stop) }()
	var total int64
	err := writeLoad(dir, seed, stop, func(n int64) {
		total += n
		fmt.Println(total)
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

func startWriters(t *testing.T, dirs []string) *loadWriters {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	w := &loadWriters{}
	for i, dir := range dirs {
		cmd := exec.Command(exe, "-test.run=^$")
		cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s:%d", writerEnv, dir, i))
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		w.cmds = append(w.cmds, cmd)
		w.wg.Add(1)
		go func() {
			defer w.wg.Done()
			var last int64
			sc := bufio.NewScanner(out)
			for sc.Scan() {
				if n, err := strconv.ParseInt(sc.Text(), 10, 64); err == nil {
					w.written.Add(n - last)
					last = n
				}
			}
			if err := cmd.Wait(); err != nil || !w.stopping.Load() {
				w.firstMu.Lock()
				if w.first == nil {
					w.first = fmt.Errorf("writer on %s exited (%v): %s", dir, err, strings.TrimSpace(stderr.String()))
				}
				w.firstMu.Unlock()
			}
		}()
	}
	t.Cleanup(func() { _ = w.halt() })
	return w
}

// writeLoad is one session: a 256 MiB file written sequentially in 1 MiB chunks, wrapping, and a
// 64 MiB file overwritten at random in 4-8 KiB pieces, 16 of them per chunk, then fsync of both.
func writeLoad(dir string, seed uint64, stop <-chan struct{}, progress func(int64)) error {
	rng := rand.New(rand.NewPCG(seed, 7))
	seq, err := os.Create(filepath.Join(dir, "seq.bin"))
	if err != nil {
		return err
	}
	defer seq.Close()
	rnd, err := os.Create(filepath.Join(dir, "rand.bin"))
	if err != nil {
		return err
	}
	defer rnd.Close()
	if err := rnd.Truncate(64 << 20); err != nil {
		return err
	}
	chunk := make([]byte, 1<<20)
	for i := range chunk {
		chunk[i] = byte(rng.Uint32())
	}
	var off int64
	for n := 0; ; n++ {
		select {
		case <-stop:
			return nil
		default:
		}
		chunk[0], chunk[1] = byte(n), byte(n>>8) // no two chunks alike: nothing compresses away
		if _, err := seq.WriteAt(chunk, off); err != nil {
			return err
		}
		off = (off + int64(len(chunk))) % (256 << 20)
		for j := 0; j < 16; j++ {
			size := 4096 + rng.IntN(4097)
			if _, err := rnd.WriteAt(chunk[:size], rng.Int64N(64<<20-8192)); err != nil {
				return err
			}
		}
		if err := seq.Sync(); err != nil {
			return err
		}
		if err := rnd.Sync(); err != nil {
			return err
		}
		progress(int64(len(chunk)) + 16*6144)
	}
}

// halt stops the writers and waits for them; it returns the first failure, if any.
func (w *loadWriters) halt() error {
	if w.stopping.Swap(true) {
		return nil
	}
	for _, cmd := range w.cmds {
		_ = cmd.Process.Signal(syscall.SIGTERM)
	}
	w.wg.Wait()
	w.firstMu.Lock()
	defer w.firstMu.Unlock()
	return w.first
}

// rate measures the writers' throughput over d, in MB/s.
func (w *loadWriters) rate(d time.Duration) float64 {
	before := w.written.Load()
	time.Sleep(d)
	return float64(w.written.Load()-before) / d.Seconds() / 1e6
}

// loadSamples are one phase's samples, and how many of each failed.
type loadSamples struct {
	d      map[string][]time.Duration
	failed map[string]int
	errs   []string
}

func (ls *loadSamples) timed(method string, f func() error) bool {
	t0 := time.Now()
	if err := f(); err != nil {
		ls.failed[method]++
		ls.errs = append(ls.errs, fmt.Sprintf("%s: %v", method, err))
		return false
	}
	ls.d[method] = append(ls.d[method], time.Since(t0))
	return true
}

func (bm *bencher) load(t *testing.T, n int) {
	b, p := bm.bed, bm.bed.plugin()
	guest := b.backend() == "zfs"
	writers, reps := loadSettings(t, guest)
	golden := map[string]string{"golden": project(n)}
	gen := bm.gens[n]
	buf := make([]byte, 4<<20)
	newRNG(43).fill(buf)
	const written = 20 << 20 // what each timed volume writes before its Unmount, as a session would

	// The sessions that make the load: plugin volumes from the same golden, mounted.
	var dirs []string
	for i := 0; i < writers; i++ {
		name := fmt.Sprintf("ldw%d", i)
		if err := p.create(name, golden); err != nil {
			t.Fatal(err)
		}
		mp, err := p.mount(name, "bench")
		if err != nil {
			t.Fatal(err)
		}
		dirs = append(dirs, mp)
		t.Cleanup(func() {
			_ = p.unmount(name, "bench")
			_ = p.remove(name)
		})
	}

	param := fmt.Sprintf("%d writers", writers)
	if sp := os.Getenv("ZGOLDEN_BENCH_SPARES"); sp != "" {
		param += ", spares " + sp
	}
	e := Entry{Case: "load", Files: n, Param: param, Methods: map[string]Stat{}, Ratios: map[string]float64{}, Extra: map[string]any{}}
	phase := func(name string, loaded bool) {
		var w *loadWriters
		txgFrom := bm.lastTxg()
		if loaded {
			w = startWriters(t, dirs)
			time.Sleep(10 * time.Second) // until the pool has dirty data to sync
			e.Extra["writers MB/s, no creates"] = w.rate(20 * time.Second)
		}
		ls := &loadSamples{d: map[string][]time.Duration{}, failed: map[string]int{}}
		startBytes, start := int64(0), time.Now()
		if w != nil {
			startBytes = w.written.Load()
		}
		for r := 0; r < reps; r++ {
			vol := fmt.Sprintf("ld-%s-%d", name, r)
			// The same no-op request as the probes', but spread over the phase as the Creates are:
			// the probes' eight run back to back at its end, so they may all meet one quiet moment
			// of the pool's transaction group cycle. Sent right before a Create, this one meets
			// about the moment the Create meets.
			ls.timed("request that does no work, just before a Create", func() error {
				return p.call("Capabilities", struct{}{}, nil)
			})
			var mp string
			if ls.timed("plugin create+mount", func() error {
				// Its Create part on its own as well: with spares it runs no zfs command, and
				// what is left of create+mount under load is the Mount's.
				if !ls.timed("plugin create (of create+mount)", func() error { return p.create(vol, golden) }) {
					return fmt.Errorf("create %s failed", vol)
				}
				var err error
				mp, err = p.mount(vol, "bench")
				return err
			}) {
				if err := writeFile(filepath.Join(mp, "written.bin"), buf, written); err != nil {
					t.Fatal(err)
				}
				ls.timed("plugin unmount", func() error { return p.unmount(vol, "bench") })
			}
			ls.timed("plugin remove", func() error { return p.remove(vol) })

			raw := "ldraw-" + name + "-" + strconv.Itoa(r)
			target := filepath.Join(filepath.Dir(b.oldDir()), "rawmnt", raw)
			if ls.timed("raw create+mount", func() error { _, err := b.rawBlock(gen, raw, target); return err }) {
				if err := writeFile(filepath.Join(target, "written.bin"), buf, written); err != nil {
					t.Fatal(err)
				}
				ls.timed("raw unmount", func() error { return unmountRetry(target) })
			}
			ls.timed("raw destroy", func() error { return b.rawDestroy(raw) })
			_ = os.Remove(target)
		}
		zfsTarget := ""
		if zb, ok := b.(*zfsBed); ok {
			zfsTarget = zb.pool
		}
		e.Extra["probes, "+name] = p.primitiveProbes(filepath.Dir(p.logPath), zfsTarget, 8)
		for call, ds := range p.serverTimes("ld-" + name + "-") {
			e.Extra["inside the plugin, "+call+", "+name] = Summarize(ds)
		}
		for call, parts := range p.outsideTimes("ld-" + name + "-") {
			e.Extra["outside the plugin, before the handler, "+call+", "+name] = Summarize(parts["before"])
			e.Extra["outside the plugin, after the handler, "+call+", "+name] = Summarize(parts["after"])
		}
		p.traceLog("ld-" + name + "-")
		if w != nil {
			during := time.Since(start)
			e.Extra["writers MB/s, whole phase"] = float64(w.written.Load()-startBytes) / during.Seconds() / 1e6
			// What zgolden's Creates alone cost the writers: for 20 s nothing but volumes made,
			// mounted, unmounted and removed through the plugin, back to back (spares used up are
			// restocked meanwhile, a cost of the Creates too), against 20 s with nothing, before
			// and after. The whole phase's figure above also carries the raw sequences' clones
			// and destroys and every timed volume's 20 MB write.
			//
			// A Create that fails is counted and the burst goes on, as the timed calls above
			// are: once the burst has used up the spares, a Create clones, and on a pool this
			// busy that can run out of Docker's time, which is a result, not a broken bench.
			from, t0, k := w.written.Load(), time.Now(), 0
			var burstCreates []time.Duration
			var burstErrs []string
			for ; time.Since(t0) < 20*time.Second; k++ {
				vol := fmt.Sprintf("ldb-%d", k)
				c0 := time.Now()
				err := p.create(vol, golden)
				burstCreates = append(burstCreates, time.Since(c0))
				if err != nil {
					burstErrs = append(burstErrs, fmt.Sprintf("create %s: %v", vol, err))
					continue
				}
				if _, err := p.mount(vol, "bench"); err != nil {
					t.Fatal(err)
				}
				if err := p.unmount(vol, "bench"); err != nil {
					t.Fatal(err)
				}
				if err := p.remove(vol); err != nil {
					t.Fatal(err)
				}
			}
			e.Extra["writers MB/s, during creates"] = float64(w.written.Load()-from) / time.Since(t0).Seconds() / 1e6
			e.Extra["creates in the 20 s burst"] = k
			e.Extra["burst creates"] = Summarize(burstCreates)
			if zfsTarget != "" { // the reflink store's log does not say where a Create's volume came from
				from := p.createdFrom("ldb-")
				e.Extra["burst creates served"] = fmt.Sprintf("%d from a ready spare, %d waited for a spare being made, %d cloned, %d failed",
					from["spare"], from["waited"], from["other"], len(burstErrs))
			}
			if len(burstErrs) > 0 {
				e.Extra["burst creates failed"] = fmt.Sprintf("%d of %d", len(burstErrs), k)
				e.Extra["errors, burst"] = burstErrs
				t.Logf("burst: %d of %d creates failed: %v", len(burstErrs), k, burstErrs)
			}
			after := w.rate(20 * time.Second)
			e.Extra["writers MB/s, no creates, after"] = after
			if before, ok := e.Extra["writers MB/s, no creates"].(float64); ok {
				e.Extra["writers MB/s, no creates"] = (before + after) / 2
				e.Extra["writers MB/s, no creates, before"] = before
			}
			if err := w.halt(); err != nil {
				t.Fatalf("a load writer failed: %v", err)
			}
		}
		for m, s := range ls.d {
			e.Methods[m+", "+name] = Summarize(s)
		}
		for m, k := range ls.failed {
			e.Extra[m+", "+name+": failed"] = fmt.Sprintf("%d of %d", k, reps)
		}
		if len(ls.errs) > 0 {
			e.Extra["errors, "+name] = ls.errs
			t.Logf("%s: %d operations failed: %v", name, len(ls.errs), ls.errs)
		}
		if syncs := bm.txgSyncsSince(txgFrom); len(syncs) > 0 {
			e.Extra["txg sync ms, "+name] = SummarizeMs(syncs)
		}
	}
	phase("idle", false)
	phase("load", true)

	p99 := func(m string) float64 { return e.Methods[m].P99 }
	med := func(m string) float64 { return e.Methods[m].Median }
	// The goals, as ratios: under load against zgolden's own idle p50, and against the
	// raw sequence under the same load.
	e.Ratios["plugin create+mount p99 load / p50 idle"] = Ratio(p99("plugin create+mount, load"), med("plugin create+mount, idle"))
	e.Ratios["raw create+mount p99 load / plugin p99 load"] = Ratio(p99("raw create+mount, load"), p99("plugin create+mount, load"))
	e.Ratios["plugin unmount p99 load / p50 idle"] = Ratio(p99("plugin unmount, load"), med("plugin unmount, idle"))
	e.Ratios["plugin remove p99 load / p50 idle"] = Ratio(p99("plugin remove, load"), med("plugin remove, idle"))
	if a, ok := e.Extra["writers MB/s, no creates"].(float64); ok && a > 0 {
		if d, ok := e.Extra["writers MB/s, during creates"].(float64); ok {
			e.Ratios["writers throughput during creates / without"] = d / a
		}
	}
	bm.add(e)
}

// lastTxg is the newest transaction group of the ZFS bed's pool (0 elsewhere).
func (bm *bencher) lastTxg() uint64 {
	zb, ok := bm.bed.(*zfsBed)
	if !ok {
		return 0
	}
	txgs, err := zfsutil.TxgSyncs(zb.pool)
	if err != nil || len(txgs) == 0 {
		return 0
	}
	return txgs[len(txgs)-1].Txg
}

// txgSyncsSince returns the sync times, in ms, of the pool's synced txgs after txg from.
func (bm *bencher) txgSyncsSince(from uint64) []float64 {
	zb, ok := bm.bed.(*zfsBed)
	if !ok {
		return nil
	}
	txgs, err := zfsutil.TxgSyncs(zb.pool)
	if err != nil {
		return nil
	}
	var out []float64
	for _, x := range txgs {
		if x.Txg > from && x.Complete {
			out = append(out, float64(x.Sync.Microseconds())/1000)
		}
	}
	return out
}
