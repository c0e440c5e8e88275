package bench

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/zgolden/zgolden/tests/harness"
)

// TestBench is `make bench`: it runs every case on the backend this machine has (the reflink
// store on the host, ZFS in the guest) and prints each result as a JSON line (JSONPrefix) as
// soon as it is measured, so a run cut short still reports what it finished. It reports; it
// never fails on speed, only when an operation errors.
//
// Environment (all optional):
//
//	ZGOLDEN_BENCH=1                 required: without it the test skips (make test must not run it)
//	ZGOLDEN_BENCH_SIZES=1000,10000  golden file counts (host default 1000,10000,100000,1000000;
//	                                guest default 1000,10000,100000)
//	ZGOLDEN_BENCH_REPS=10           samples per fast method (plugin, raw) per file count
//	ZGOLDEN_BENCH_CP_REPS=5,5,3,2   samples of cp -a per file count (the slow one)
//	ZGOLDEN_BENCH_LARGE=4x256M      large files in each golden (guest default 2x64M)
//	ZGOLDEN_BENCH_CASES=...         subset of create,remove,wa,concurrency,scale,workspace,load,transfer
//	ZGOLDEN_BENCH_LOAD_WRITERS=4    session volumes writing during the load case
//	ZGOLDEN_BENCH_LOAD_REPS=5       samples per method and phase in the load case (guest: 3)
//	ZGOLDEN_BENCH_SPARES=N          run the plugin with --spares N (warm spares; default 0, the
//	                                Create that clones, not the plugin's default)
//	ZGOLDEN_BENCH_SCALE=500         volumes in the scale case
//	ZGOLDEN_BENCH_REMOVE=0,100M,1G  bytes written into a volume before its Remove is timed
//	ZGOLDEN_BENCH_DIR=DIR           work directory (default /var/tmp/zgolden-bench-ID)
func TestBench(t *testing.T) {
	if os.Getenv("ZGOLDEN_BENCH") != "1" {
		t.Skip("benchmark: set ZGOLDEN_BENCH=1 (make bench) to run it")
	}
	harness.RequireRoot(t)
	cfg := loadConfig(t)
	dir := os.Getenv("ZGOLDEN_BENCH_DIR")
	if dir == "" {
		dir = filepath.Join("/var/tmp", "zgolden-bench-"+harness.ID())
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if !t.Failed() || os.Getenv("ZGOLDEN_BENCH_KEEP") == "" {
			_ = os.RemoveAll(dir) // after every mount under it is gone (cleanups run in reverse)
		}
	})
	bm := &bencher{t: t, cfg: cfg, run: Run{Started: time.Now().UTC(), Config: cfg}}
	if harness.InGuest() || os.Getenv("ZGOLDEN_TEST_ZPOOL") != "" {
		bm.bed = newZFSBed(t, dir)
	} else {
		bm.bed = newReflinkBed(t, dir)
	}
	bm.run.Env = environment(bm.bed)
	bm.emit("env", bm.run.Env)
	t.Logf("bench: %s backend on %s, work dir %s, sizes %v", bm.bed.backend(), bm.bed.where(), dir, cfg.Sizes)

	has := func(c string) bool { return slices.Contains(cfg.Cases, c) }
	bm.gens = map[int]string{}
	for i, n := range cfg.Sizes {
		ok := t.Run(fmt.Sprintf("create/%d", n), func(t *testing.T) {
			bm.gens[n] = bm.goldenAndCreate(t, n, cfg.CopyReps[i], has("create"))
		})
		if !ok {
			t.FailNow()
		}
	}
	ref := bm.refSize()
	if has("wa") {
		t.Run("write-amplification", func(t *testing.T) { bm.writeAmplification(t) })
	}
	if has("remove") {
		t.Run("remove", func(t *testing.T) { bm.removeLatency(t, ref) })
	}
	if has("concurrency") {
		t.Run("concurrency", func(t *testing.T) { bm.concurrency(t, ref) })
	}
	if has("workspace") {
		t.Run("workspace", func(t *testing.T) { bm.workspace(t) })
	}
	if has("scale") {
		t.Run("scale", func(t *testing.T) { bm.scale(t, cfg.Sizes[0]) })
	}
	if has("load") {
		t.Run("load", func(t *testing.T) { bm.load(t, cfg.Sizes[0]) })
	}
	if has("transfer") {
		t.Run("transfer", func(t *testing.T) { bm.transfer(t, ref) })
	}
	bm.run.Env.LoadEnd = loadavg()
	bm.run.Finished = time.Now().UTC()
	bm.emit("run", bm.run)
	if out := os.Getenv("ZGOLDEN_BENCH_OUT"); out != "" {
		data, _ := json.MarshalIndent(bm.run, "", "  ")
		if err := os.WriteFile(out, data, 0o644); err != nil {
			t.Error(err)
		}
	}
}

type bencher struct {
	t    *testing.T
	cfg  Config
	bed  bed
	run  Run
	mu   sync.Mutex
	gens map[int]string // golden file count -> generation source
}

// emit prints one result line for the host to collect.
func (bm *bencher) emit(kind string, v any) {
	data, err := json.Marshal(map[string]any{"type": kind, kind: v})
	if err != nil {
		bm.t.Errorf("marshal %s: %v", kind, err)
		return
	}
	bm.mu.Lock()
	defer bm.mu.Unlock()
	fmt.Printf("%s%s\n", JSONPrefix, data)
}

func (bm *bencher) add(e Entry) {
	e.Backend, e.Where = bm.bed.backend(), bm.bed.where()
	bm.mu.Lock()
	bm.run.Entries = append(bm.run.Entries, e)
	bm.mu.Unlock()
	bm.emit("entry", e)
	var parts []string
	for _, m := range sortedKeys(e.Methods) {
		s := e.Methods[m]
		parts = append(parts, fmt.Sprintf("%s=%.1fms(p99 %.1f, n=%d)", m, s.Median, s.P99, s.N))
	}
	for _, r := range sortedKeys(e.Ratios) {
		parts = append(parts, fmt.Sprintf("%s=%.1fx", r, e.Ratios[r]))
	}
	bm.t.Logf("%s files=%d %s: %s", e.Case, e.Files, e.Param, strings.Join(parts, " "))
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// refSize is the golden the single-size cases use: the one nearest 10k files.
func (bm *bencher) refSize() int {
	best := bm.cfg.Sizes[0]
	for _, n := range bm.cfg.Sizes {
		if abs(n-10000) < abs(best-10000) {
			best = n
		}
	}
	return best
}

func abs(n int) int {
	if n < 0 {
		return -n
	}
	return n
}

func project(n int) string { return "g" + strconv.Itoa(n) }

func (bm *bencher) treeDir(n int) string {
	return filepath.Join(bm.bed.oldDir(), fmt.Sprintf("golden-%d", n))
}

// ---- case 1: create + first mount ---------------------------------------------------------

// goldenAndCreate generates a golden of n files on the old XFS, imports it, and measures
// Create+Mount through the plugin against the raw sequence and cp -a --reflink=auto, the
// methods alternating round by round. It returns the generation's source.
func (bm *bencher) goldenAndCreate(t *testing.T, n, copyReps int, measure bool) string {
	b, p := bm.bed, bm.bed.plugin()
	src := bm.treeDir(n)
	t0 := time.Now()
	st, err := generateTree(src, bm.spec(n))
	if err != nil {
		t.Fatalf("generate golden of %d files: %v", n, err)
	}
	genTook := time.Since(t0)
	b.settle()
	gen, importTook := p.importGolden(t, src, project(n), "block")
	b.settle()
	t.Logf("golden %d: %d entries (%d files, %d dirs, %d symlinks, %d hard links, %.0f MiB) generated in %s, imported in %s",
		n, st.Entries, st.Files, st.Dirs, st.Symlinks, st.Hardlinks, float64(st.Bytes)/(1<<20), genTook.Round(time.Millisecond), importTook.Round(time.Millisecond))
	bm.add(Entry{Case: "import", Files: n, Methods: map[string]Stat{"golden import": Summarize([]time.Duration{importTook})},
		Extra: map[string]any{"entries": st.Entries, "files": st.Files, "dirs": st.Dirs, "symlinks": st.Symlinks,
			"hardlinks": st.Hardlinks, "bytes": st.Bytes, "generate_ms": genTook.Milliseconds(), "generation": gen}})
	if !measure {
		return gen
	}

	samples := map[string][]time.Duration{}
	steps := map[string][]time.Duration{}
	reps := bm.cfg.Reps
	for r := 0; r < reps; r++ {
		methods := []string{"plugin", "raw"}
		// cp is slow: it runs in copyReps of the rounds, spread evenly, so drift hits it too.
		if (r+1)*copyReps/reps > r*copyReps/reps {
			methods = append(methods, "cp")
		}
		for i := range methods { // rotate, so no method always goes first
			m := methods[(i+r)%len(methods)]
			name := fmt.Sprintf("c%d-%s-%d", n, m, r)
			b.settle()
			switch m {
			case "plugin":
				t0 := time.Now()
				if err := p.create(name, map[string]string{"golden": project(n)}); err != nil {
					t.Fatal(err)
				}
				t1 := time.Now()
				if _, err := p.mount(name, "bench"); err != nil {
					t.Fatal(err)
				}
				t2 := time.Now()
				samples["plugin"] = append(samples["plugin"], t2.Sub(t0))
				steps["plugin create"] = append(steps["plugin create"], t1.Sub(t0))
				steps["plugin mount"] = append(steps["plugin mount"], t2.Sub(t1))
				if err := p.unmount(name, "bench"); err != nil {
					t.Fatal(err)
				}
				b.settle()
				t3 := time.Now()
				if err := p.remove(name); err != nil {
					t.Fatal(err)
				}
				steps["plugin remove"] = append(steps["plugin remove"], time.Since(t3))
			case "raw":
				target := filepath.Join(bm.bed.oldDir(), "..", "rawmnt", name)
				t0 := time.Now()
				st, err := b.rawBlock(gen, name, target)
				if err != nil {
					t.Fatal(err)
				}
				samples["raw"] = append(samples["raw"], time.Since(t0))
				for k, d := range st {
					steps["raw "+k] = append(steps["raw "+k], d)
				}
				if err := b.rawCleanup(name, target); err != nil {
					t.Fatal(err)
				}
			case "cp":
				dst := filepath.Join(b.oldDir(), name)
				t0 := time.Now()
				must(t, "cp", "-a", "--reflink=auto", src, dst)
				samples["cp"] = append(samples["cp"], time.Since(t0))
				t1 := time.Now()
				b.settle() // the copy's writeback: what the disk still does after cp returned
				steps["cp writeback"] = append(steps["cp writeback"], time.Since(t1))
				t2 := time.Now()
				must(t, "rm", "-rf", dst)
				steps["cp rm -rf"] = append(steps["cp rm -rf"], time.Since(t2))
			}
		}
	}
	e := Entry{Case: "create_mount", Files: n, Methods: map[string]Stat{}, Ratios: map[string]float64{}, Extra: map[string]any{}}
	for m, s := range samples {
		e.Methods[m] = Summarize(s)
	}
	steps2 := map[string]Stat{}
	for k, s := range steps {
		steps2[k] = Summarize(s)
	}
	e.Extra["steps"] = steps2
	e.Ratios["cp/plugin"] = Ratio(e.Methods["cp"].Median, e.Methods["plugin"].Median)
	e.Ratios["cp/raw"] = Ratio(e.Methods["cp"].Median, e.Methods["raw"].Median)
	e.Ratios["plugin/raw"] = Ratio(e.Methods["plugin"].Median, e.Methods["raw"].Median)
	bm.add(e)
	return gen
}

func (bm *bencher) spec(n int) treeSpec {
	cnt, size := parseLarge(bm.cfg.Large)
	return treeSpec{Files: n, LargeCount: cnt, LargeSize: size}
}

// ---- case 2: remove latency -----------------------------------------------------------------

// removeLatency times Remove of a clone with 0, 100 MB and 1 GB written after it was cloned;
// the written sizes alternate round by round.
func (bm *bencher) removeLatency(t *testing.T, n int) {
	b, p := bm.bed, bm.bed.plugin()
	sizes := bm.cfg.RemoveSizes
	rounds := max(2, bm.cfg.Reps/3)
	samples, rawSamples := map[string][]time.Duration{}, map[string][]time.Duration{}
	pacedSamples := map[string][]time.Duration{}
	buf := make([]byte, 4<<20)
	newRNG(42).fill(buf)
	for r := 0; r < rounds; r++ {
		for i := range sizes {
			w := sizes[(i+r)%len(sizes)]
			bytesN, err := parseBytes(w)
			if err != nil {
				t.Fatalf("ZGOLDEN_BENCH_REMOVE %q: %v", w, err)
			}
			name := fmt.Sprintf("rm%d-%s", r, strings.ToLower(w))
			if err := p.create(name, map[string]string{"golden": project(n)}); err != nil {
				t.Fatal(err)
			}
			mp, err := p.mount(name, "bench")
			if err != nil {
				t.Fatal(err)
			}
			if err := writeFile(filepath.Join(mp, "written.bin"), buf, bytesN); err != nil {
				t.Fatal(err)
			}
			if err := p.unmount(name, "bench"); err != nil {
				t.Fatal(err)
			}
			b.settle()
			t0 := time.Now()
			if err := p.remove(name); err != nil {
				t.Fatal(err)
			}
			samples[w] = append(samples[w], time.Since(t0))

			// The same without the plugin: the floor of a Remove (zfs destroy, or unlink).
			target := filepath.Join(filepath.Dir(b.oldDir()), "rawmnt", name)
			d, err := bm.rawRemove(nil, bm.gens[n], name, target, buf, bytesN)
			if err != nil {
				t.Fatal(err)
			}
			rawSamples[w] = append(rawSamples[w], d)
			if fp, ok := b.(freePacer); ok {
				d, err := bm.rawRemove(fp, bm.gens[n], name+"-paced", target, buf, bytesN)
				if err != nil {
					t.Fatal(err)
				}
				pacedSamples[w] = append(pacedSamples[w], d)
			}
		}
	}
	e := Entry{Case: "remove", Files: n, Methods: map[string]Stat{}, Ratios: map[string]float64{}}
	for w, s := range samples {
		e.Methods["plugin remove, "+w+" written"] = Summarize(s)
		e.Methods["raw destroy, "+w+" written"] = Summarize(rawSamples[w])
		e.Ratios["plugin/raw, "+w+" written"] = Ratio(e.Methods["plugin remove, "+w+" written"].Median, e.Methods["raw destroy, "+w+" written"].Median)
	}
	first, last := sizes[0], sizes[len(sizes)-1]
	e.Ratios[last+"/"+first] = Ratio(e.Methods["plugin remove, "+last+" written"].Median, e.Methods["plugin remove, "+first+" written"].Median)
	if len(pacedSamples) > 0 {
		m := func(w string) string { return "raw destroy, " + w + " written, " + pacedTunable }
		for w, s := range pacedSamples {
			e.Methods[m(w)] = Summarize(s)
		}
		e.Ratios[last+"/"+first+", "+pacedTunable] = Ratio(e.Methods[m(last)].Median, e.Methods[m(first)].Median)
	}
	bm.add(e)
}

// freePacer is a bed whose kernel paces freeing after a destroy: ZFS's zfs_free_min_time_ms
// (1000 by default) makes the transaction group that carries a destroy spend at least that long
// freeing the destroyed blocks when there are any, and zfs destroy waits for that group; a clone
// with nothing written has nothing of its own to free. The Remove case times the raw destroy
// once more with the tunable lowered, to show where a Remove's time goes.
type freePacer interface {
	// setFreeMinTime sets zfs_free_min_time_ms and returns the value it replaced.
	setFreeMinTime(ms string) (old string, err error)
}

const pacedTunable = "zfs_free_min_time_ms=50"

// rawRemove is the raw create, write of n bytes, unmount and destroy of the Remove case, with
// only the destroy timed; with fp, the destroy runs with zfs_free_min_time_ms lowered to 50.
func (bm *bencher) rawRemove(fp freePacer, gen, name, target string, buf []byte, n int64) (time.Duration, error) {
	b := bm.bed
	if _, err := b.rawBlock(gen, name, target); err != nil {
		return 0, err
	}
	if err := writeFile(filepath.Join(target, "written.bin"), buf, n); err != nil {
		return 0, err
	}
	if err := unmountRetry(target); err != nil {
		return 0, err
	}
	b.settle()
	old := ""
	if fp != nil {
		var err error
		if old, err = fp.setFreeMinTime("50"); err != nil {
			return 0, err
		}
	}
	t0 := time.Now()
	err := b.rawDestroy(name)
	d := time.Since(t0)
	if fp != nil {
		if _, rerr := fp.setFreeMinTime(old); err == nil {
			err = rerr
		}
	}
	_ = os.Remove(target)
	return d, err
}

// writeFile writes n bytes of buf, repeated, to path and fsyncs it.
func writeFile(path string, buf []byte, n int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	for left := n; left > 0; left -= int64(len(buf)) {
		// A different first word per chunk: no two 8K blocks are the same.
		buf[0], buf[1], buf[2] = byte(left), byte(left>>8), byte(left>>16)
		for off := 8192; off < len(buf); off += 8192 {
			buf[off] ^= byte(left >> 24)
		}
		if _, err := f.Write(buf[:min(int64(len(buf)), left)]); err != nil {
			f.Close()
			return err
		}
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// ---- case 3: write amplification and dedup -----------------------------------------------

// writeAmplification measures the bytes the disks wrote for one Create+Mount and for one
// cp -a --reflink=auto of the largest golden that was made, and on ZFS the dedup table's
// entries, then repeats the copy on a dedup=on zvol: the problem zgolden avoids.
func (bm *bencher) writeAmplification(t *testing.T) {
	b, p := bm.bed, bm.bed.plugin()
	n := bm.cfg.WASize
	src := bm.treeDir(n)
	if _, err := os.Stat(src); err != nil {
		t.Fatalf("golden tree of %d files is gone: %v", n, err)
	}
	zb, isZFS := b.(*zfsBed)
	e := Entry{Case: "write_amplification", Files: n, Methods: map[string]Stat{}, Ratios: map[string]float64{}, Extra: map[string]any{}}
	delta := func(before, after map[string]uint64) map[string]uint64 {
		d := map[string]uint64{}
		for k, v := range after {
			d[k] = v - before[k]
		}
		return d
	}
	// The plugin: Create + Mount, then everything flushed.
	var pluginBytes []float64
	for r := 0; r < 3; r++ {
		name := fmt.Sprintf("wa%d", r)
		b.settle()
		before := b.diskWrites()
		t0 := time.Now()
		if err := p.create(name, map[string]string{"golden": project(n)}); err != nil {
			t.Fatal(err)
		}
		mp, err := p.mount(name, "bench")
		if err != nil {
			t.Fatal(err)
		}
		took := time.Since(t0)
		flushFS(t, mp)
		b.settle()
		d := delta(before, b.diskWrites())
		key := "pool"
		if !isZFS {
			key = "store_xfs"
		}
		pluginBytes = append(pluginBytes, float64(d[key]))
		e.Extra[fmt.Sprintf("plugin_%d", r)] = map[string]any{"bytes_written": d, "create_mount_ms": took.Milliseconds()}
		if err := p.unmount(name, "bench"); err != nil {
			t.Fatal(err)
		}
		if err := p.remove(name); err != nil {
			t.Fatal(err)
		}
	}
	e.Extra["plugin_bytes_written_median"] = medianOf(pluginBytes)
	if isZFS {
		ddt, line := zb.ddtEntries()
		e.Extra["plugin_ddt_entries"] = ddt
		e.Extra["plugin_ddt_line"] = line
	}
	// The old way, dedup off.
	cpRun := func(label, fromDir, toDir, mnt, zvolDev string) map[string]any {
		b.settle()
		before := b.diskWrites()
		zvBefore := uint64(0)
		if zvolDev != "" {
			zvBefore = sectorsWritten(zvolDev)
		}
		t0 := time.Now()
		must(t, "cp", "-a", "--reflink=auto", fromDir, toDir)
		cpTook := time.Since(t0)
		flushFS(t, mnt)
		b.settle()
		tail := time.Since(t0) - cpTook
		d := delta(before, b.diskWrites())
		res := map[string]any{"bytes_written": d, "cp_ms": cpTook.Milliseconds(), "writeback_after_cp_ms": tail.Milliseconds()}
		if zvolDev != "" {
			zv := sectorsWritten(zvolDev) - zvBefore
			res["zvol_bytes_written"] = zv
			if zv > 0 {
				res["pool_bytes_per_zvol_byte"] = Ratio(float64(d["pool"]), float64(zv))
			}
		}
		t.Logf("write amplification, %s: %v", label, res)
		return res
	}
	if isZFS {
		old := cpRun("cp -a onto XFS on a dedup=off zvol", src, filepath.Join(b.oldDir(), "wa-copy"), b.oldDir(), zb.oldDev)
		ddt, line := zb.ddtEntries()
		old["ddt_entries_after"], old["ddt_line"] = ddt, line
		e.Extra["cp_dedup_off"] = old
		must(t, "rm", "-rf", filepath.Join(b.oldDir(), "wa-copy"))

		// The same on a dedup=on zvol: the golden tree is written there first (that alone fills
		// the table), then one session's copy is measured.
		dmnt := filepath.Join(filepath.Dir(b.oldDir()), "dedup")
		ddev := zb.makeOldFS(t, "dedup", "on", dmnt)
		if _, err := generateTree(filepath.Join(dmnt, "golden"), bm.spec(n)); err != nil {
			t.Fatal(err)
		}
		flushFS(t, dmnt)
		b.settle()
		ddtBefore, _ := zb.ddtEntries()
		dd := cpRun("cp -a onto XFS on a dedup=on zvol", filepath.Join(dmnt, "golden"), filepath.Join(dmnt, "copy"), dmnt, ddev)
		ddtAfter, line := zb.ddtEntries()
		dd["ddt_entries_before"], dd["ddt_entries_after"], dd["ddt_entries_added"], dd["ddt_line"] = ddtBefore, ddtAfter, ddtAfter-ddtBefore, line
		e.Extra["cp_dedup_on"] = dd
		if err := unmountRetry(dmnt); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 40; i++ {
			if _, err := run("zfs", "destroy", zb.parent+"/dedup"); err == nil {
				break
			}
			time.Sleep(250 * time.Millisecond)
		}
		e.Ratios["cp_dedup_off/plugin bytes"] = Ratio(float64(old["bytes_written"].(map[string]uint64)["pool"]), medianOf(pluginBytes))
		e.Ratios["cp_dedup_on/plugin bytes"] = Ratio(float64(dd["bytes_written"].(map[string]uint64)["pool"]), medianOf(pluginBytes))
		e.Ratios["cp_dedup_on/cp_dedup_off bytes"] = Ratio(float64(dd["bytes_written"].(map[string]uint64)["pool"]), float64(old["bytes_written"].(map[string]uint64)["pool"]))
	} else {
		old := cpRun("cp -a onto XFS (reflink=1)", src, filepath.Join(b.oldDir(), "wa-copy"), b.oldDir(), "")
		e.Extra["cp"] = old
		must(t, "rm", "-rf", filepath.Join(b.oldDir(), "wa-copy"))
		e.Ratios["cp/plugin bytes"] = Ratio(float64(old["bytes_written"].(map[string]uint64)["old_xfs"]), medianOf(pluginBytes))
	}
	bm.add(e)
}

func medianOf(v []float64) float64 {
	s := append([]float64(nil), v...)
	slices.Sort(s)
	return Percentile(s, 50)
}

// flushFS writes everything the XFS holding path has in memory to its device, metadata in
// place included (xfs_freeze pushes the log's items home): syncfs alone leaves them in the log,
// to be written later, which is the tail of writes the seeds saw after cp returned.
func flushFS(t *testing.T, path string) {
	t.Helper()
	syncfs(path)
	must(t, "xfs_freeze", "-f", path)
	must(t, "xfs_freeze", "-u", path)
}

func syncfs(path string) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return
	}
	defer unix.Close(fd)
	_ = unix.Syncfs(fd)
}

// ---- case 4: concurrency ---------------------------------------------------------------------

// concurrency starts N Creates (each followed by its Mount, as a container start does) at once
// from one golden, for N = 1, 8, 32.
func (bm *bencher) concurrency(t *testing.T, n int) {
	b, p := bm.bed, bm.bed.plugin()
	var single float64 // median create+mount at N=1
	for _, c := range []int{1, 8, 32} {
		rounds := 1
		switch c {
		case 1:
			rounds = bm.cfg.Reps
		case 8:
			rounds = max(1, bm.cfg.Reps/4)
		}
		var creates, mounts, both, totals, raws, rawTotals []time.Duration
		for r := 0; r < rounds; r++ {
			b.settle()
			var mu sync.Mutex
			total, err := parallel(c, func(i int) error {
				name := fmt.Sprintf("cc%d-%d-%d", c, r, i)
				t0 := time.Now()
				err := p.create(name, map[string]string{"golden": project(n)})
				t1 := time.Now()
				if err == nil {
					_, err = p.mount(name, "bench")
				}
				t2 := time.Now()
				mu.Lock()
				defer mu.Unlock()
				creates, mounts, both = append(creates, t1.Sub(t0)), append(mounts, t2.Sub(t1)), append(both, t2.Sub(t0))
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			totals = append(totals, total)
			bm.cleanup(t, fmt.Sprintf("cc%d-%d-", c, r), c, true)

			// The same N raw sequences at once: is any queueing the plugin's, or the system's?
			b.settle()
			total, err = parallel(c, func(i int) error {
				name := fmt.Sprintf("rc%d-%d-%d", c, r, i)
				t0 := time.Now()
				_, err := b.rawBlock(bm.gens[n], name, filepath.Join(filepath.Dir(b.oldDir()), "rawmnt", name))
				mu.Lock()
				defer mu.Unlock()
				raws = append(raws, time.Since(t0))
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			rawTotals = append(rawTotals, total)
			if _, err := parallel(4, func(w int) error {
				for i := w; i < c; i += 4 {
					name := fmt.Sprintf("rc%d-%d-%d", c, r, i)
					if err := b.rawCleanup(name, filepath.Join(filepath.Dir(b.oldDir()), "rawmnt", name)); err != nil {
						return err
					}
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
		}
		e := Entry{Case: "concurrency", Files: n, Param: fmt.Sprintf("N=%d", c), Methods: map[string]Stat{
			"plugin create": Summarize(creates), "plugin mount": Summarize(mounts), "plugin create+mount": Summarize(both),
			"plugin total (all N)": Summarize(totals), "raw sequence": Summarize(raws), "raw total (all N)": Summarize(rawTotals),
		}, Ratios: map[string]float64{}}
		if c == 1 {
			single = e.Methods["plugin create+mount"].Median
		}
		e.Ratios["plugin total / one alone"] = Ratio(e.Methods["plugin total (all N)"].Median, single)
		e.Ratios["plugin total / raw total"] = Ratio(e.Methods["plugin total (all N)"].Median, e.Methods["raw total (all N)"].Median)
		e.Ratios["plugin p99 / p50"] = Ratio(e.Methods["plugin create+mount"].P99, e.Methods["plugin create+mount"].Median)
		bm.add(e)
	}
}

// parallel runs f(0..n-1) at once, released together, and returns the wall time and the first
// error.
func parallel(n int, f func(i int) error) (time.Duration, error) {
	var wg sync.WaitGroup
	errs := make([]error, n)
	start := make(chan struct{})
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			<-start
			errs[i] = f(i)
		}(i)
	}
	t0 := time.Now()
	close(start)
	wg.Wait()
	took := time.Since(t0)
	for _, err := range errs {
		if err != nil {
			return took, err
		}
	}
	return took, nil
}

// cleanup unmounts and removes volumes prefix0..prefix(count-1), four at a time.
func (bm *bencher) cleanup(t *testing.T, prefix string, count int, mounted bool) {
	p := bm.bed.plugin()
	sem := make(chan struct{}, 4)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	for i := 0; i < count; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func(name string) {
			defer func() { <-sem; wg.Done() }()
			var err error
			if mounted {
				err = p.unmount(name, "bench")
			}
			if err == nil {
				err = p.remove(name)
			}
			if err != nil {
				mu.Lock()
				if firstErr == nil {
					firstErr = err
				}
				mu.Unlock()
			}
		}(prefix + strconv.Itoa(i))
	}
	wg.Wait()
	if firstErr != nil {
		t.Fatal(firstErr)
	}
}

// ---- case 5: scale ------------------------------------------------------------------------

// scale makes ZGOLDEN_BENCH_SCALE volumes (a tenth of them mounted), then measures List, the
// plugin's memory, and restart-to-ready: from exec until the socket answers List with every
// volume, after a clean stop (SIGTERM) and after a crash (SIGKILL).
func (bm *bencher) scale(t *testing.T, n int) {
	p := bm.bed.plugin()
	count := bm.cfg.ScaleVols
	mountedN := max(1, count/10)
	rss0, _ := p.rss()
	var creates []time.Duration
	var cmu sync.Mutex
	sem := make(chan struct{}, 4)
	var wg sync.WaitGroup
	var firstErr error
	t0 := time.Now()
	for i := 0; i < count; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func(i int) {
			defer func() { <-sem; wg.Done() }()
			name := "sc" + strconv.Itoa(i)
			c0 := time.Now()
			err := p.create(name, map[string]string{"golden": project(n)})
			d := time.Since(c0)
			if err == nil && i < mountedN {
				_, err = p.mount(name, "bench")
			}
			cmu.Lock()
			defer cmu.Unlock()
			creates = append(creates, d)
			if err != nil && firstErr == nil {
				firstErr = err
			}
		}(i)
	}
	wg.Wait()
	fill := time.Since(t0)
	if firstErr != nil {
		t.Fatal(firstErr)
	}
	e := Entry{Case: "scale", Files: n, Param: fmt.Sprintf("volumes=%d mounted=%d", count, mountedN), Methods: map[string]Stat{}, Ratios: map[string]float64{}, Extra: map[string]any{}}
	e.Methods["create (4 at a time, while filling)"] = Summarize(creates)
	e.Extra["fill_total_ms"] = fill.Milliseconds()
	var lists []time.Duration
	for r := 0; r < 30; r++ {
		l0 := time.Now()
		names, err := p.list()
		if err != nil {
			t.Fatal(err)
		}
		lists = append(lists, time.Since(l0))
		if len(names) != count {
			t.Fatalf("List returned %d volumes, want %d", len(names), count)
		}
	}
	e.Methods["list"] = Summarize(lists)
	rss, hwm := p.rss()
	e.Extra["rss_kib_empty"], e.Extra["rss_kib"], e.Extra["rss_peak_kib"] = rss0, rss, hwm
	var restarts, crashes []time.Duration
	for r := 0; r < 4; r++ {
		sig := syscall.SIGTERM
		if r == 3 {
			sig = syscall.SIGKILL
		}
		p.stop(sig)
		d, err := p.startWant(count)
		if err != nil {
			t.Fatal(err)
		}
		if sig == syscall.SIGKILL {
			crashes = append(crashes, d)
		} else {
			restarts = append(restarts, d)
		}
	}
	e.Methods["restart to ready (SIGTERM)"] = Summarize(restarts)
	e.Methods["restart to ready (SIGKILL)"] = Summarize(crashes)
	rss2, _ := p.rss()
	e.Extra["rss_kib_after_restart"] = rss2
	// The mounted ones must still be mounted and held.
	for i := 0; i < mountedN; i++ {
		if err := p.remove("sc" + strconv.Itoa(i)); err == nil {
			t.Fatalf("volume sc%d was removed although it is mounted: the restart lost its mount reference", i)
		}
	}
	bm.add(e)
	c0 := time.Now()
	bm.cleanup(t, "sc", mountedN, true)
	var rest []string
	for i := mountedN; i < count; i++ {
		rest = append(rest, "sc"+strconv.Itoa(i))
	}
	for _, name := range rest {
		if err := p.remove(name); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("scale: removed %d volumes in %s", count, time.Since(c0).Round(time.Millisecond))
}

// ---- issue 8: golden workspace against git clone ------------------------------------------

// workspace compares a type=fs volume cloned from a golden workspace with a fresh git clone of
// the same repository from a local bare repository (over git's transport, file://, as from a
// server: a plain local path would hard-link the objects instead of cloning them).
func (bm *bencher) workspace(t *testing.T) {
	b, p := bm.bed, bm.bed.plugin()
	repo := filepath.Join(b.wsDir(), "src")
	commits, files := 400, 600
	if v := os.Getenv("ZGOLDEN_BENCH_REPO_COMMITS"); v != "" {
		commits, _ = strconv.Atoi(v)
	}
	makeRepo(t, repo, commits, files)
	bare := filepath.Join(b.wsDir(), "bare.git")
	must(t, "git", "clone", "-q", "--bare", repo, bare)
	golden := filepath.Join(b.wsDir(), "golden")
	must(t, "git", "clone", "-q", "--no-local", "file://"+bare, golden)
	b.settle()
	gen, importTook := p.importGolden(t, golden, "ws", "fs")
	du := strings.Fields(must(t, "du", "-sb", golden))[0]
	samples := map[string][]time.Duration{}
	reps := min(bm.cfg.Reps, 5)
	for r := 0; r < reps; r++ {
		methods := []string{"plugin", "raw", "git clone"}
		for i := range methods {
			m := methods[(i+r)%len(methods)]
			name := fmt.Sprintf("ws-%d-%d", r, i)
			b.settle()
			switch m {
			case "plugin":
				t0 := time.Now()
				if err := p.create(name, map[string]string{"golden": "ws", "type": "fs"}); err != nil {
					t.Fatal(err)
				}
				if _, err := p.mount(name, "bench"); err != nil {
					t.Fatal(err)
				}
				samples[m] = append(samples[m], time.Since(t0))
				if err := p.unmount(name, "bench"); err != nil {
					t.Fatal(err)
				}
				if err := p.remove(name); err != nil {
					t.Fatal(err)
				}
			case "raw":
				target := filepath.Join(b.oldDir(), "..", "rawmnt", name)
				t0 := time.Now()
				if err := b.rawFS(gen, name, target); err != nil {
					t.Fatal(err)
				}
				samples[m] = append(samples[m], time.Since(t0))
				if err := b.rawCleanup(name, target); err != nil {
					t.Fatal(err)
				}
			case "git clone":
				dst := filepath.Join(b.wsDir(), name)
				t0 := time.Now()
				must(t, "git", "clone", "-q", "--no-local", "file://"+bare, dst)
				samples[m] = append(samples[m], time.Since(t0))
				must(t, "rm", "-rf", dst)
			}
		}
	}
	e := Entry{Case: "workspace", Param: fmt.Sprintf("git repo: %d commits, %d files, %s bytes checked out", commits, files, du),
		Methods: map[string]Stat{}, Ratios: map[string]float64{}, Extra: map[string]any{"import_ms": importTook.Milliseconds()}}
	for m, s := range samples {
		e.Methods[m] = Summarize(s)
	}
	e.Ratios["git clone/plugin"] = Ratio(e.Methods["git clone"].Median, e.Methods["plugin"].Median)
	e.Ratios["plugin/raw"] = Ratio(e.Methods["plugin"].Median, e.Methods["raw"].Median)
	bm.add(e)
}

const sourceChars = "abcdefghij klmnopqrstuvwxyz(){};\n\t"

// makeRepo writes a git repository of commits commits touching files files, in one git
// fast-import (hundreds of git commands would take minutes under emulation).
func makeRepo(t *testing.T, dir string, commits, files int) {
	t.Helper()
	must(t, "git", "init", "-q", "-b", "main", dir)
	var stream bytes.Buffer
	r := newRNG(8)
	body := make([]byte, 8192)
	for c := 1; c <= commits; c++ {
		fmt.Fprintf(&stream, "commit refs/heads/main\nmark :%d\ncommitter bench <bench@example.invalid> %d +0000\n", c, 1700000000+c)
		msg := fmt.Sprintf("commit %d", c)
		fmt.Fprintf(&stream, "data %d\n%s\n", len(msg), msg)
		if c > 1 {
			fmt.Fprintf(&stream, "from :%d\n", c-1)
		}
		touch := 3
		if c == 1 {
			touch = files // the first commit adds every file
		}
		for f := 0; f < touch; f++ {
			idx := f
			if c > 1 {
				idx = r.intn(files)
			}
			n := 200 + r.intn(6000)
			for i := 0; i < n; i++ { // source-like text: compressible, as code is
				body[i] = sourceChars[r.intn(len(sourceChars))]
			}
			fmt.Fprintf(&stream, "M 100644 inline src/pkg%02d/file%04d.go\ndata %d\n%s\n", idx%37, idx, n, body[:n])
		}
	}
	cmd := exec.Command("git", "-C", dir, "fast-import", "--quiet")
	cmd.Stdin = &stream
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("git fast-import: %v\n%s", err, out)
	}
	must(t, "git", "-C", dir, "checkout", "-q", "-f", "main")
}

// ---- configuration and environment ------------------------------------------------------

func loadConfig(t *testing.T) Config {
	guest := harness.InGuest()
	c := Config{
		Sizes: []int{1000, 10000, 100000, 1000000}, Reps: 10, Large: "4x256M",
		Cases:     []string{"create", "wa", "remove", "concurrency", "workspace", "scale", "load", "transfer"},
		ScaleVols: 500, RemoveSizes: []string{"0", "100M", "1G"}, WASize: 100000,
	}
	if guest {
		// Emulation (TCG) makes every step 30-100x slower: sizes and counts that keep the guest
		// part near 20 minutes. The reflink host run covers 1M files and 500 volumes.
		c.Sizes, c.Large, c.Reps, c.ScaleVols, c.WASize = []int{1000, 10000, 100000}, "2x64M", 5, 100, 10000
	}
	if v := os.Getenv("ZGOLDEN_BENCH_SIZES"); v != "" {
		c.Sizes = nil
		for _, f := range strings.Split(v, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || n < 100 {
				t.Fatalf("ZGOLDEN_BENCH_SIZES=%q: want file counts of at least 100", v)
			}
			c.Sizes = append(c.Sizes, n)
		}
		slices.Sort(c.Sizes)
	}
	if v := os.Getenv("ZGOLDEN_BENCH_REPS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("ZGOLDEN_BENCH_REPS=%q", v)
		}
		c.Reps = n
	}
	for _, n := range c.Sizes {
		switch {
		case n <= 10000 && !guest:
			c.CopyReps = append(c.CopyReps, 5)
		case n <= 10000 || n <= 100000 && !guest:
			c.CopyReps = append(c.CopyReps, 3)
		default:
			c.CopyReps = append(c.CopyReps, 2)
		}
	}
	if v := os.Getenv("ZGOLDEN_BENCH_WA_SIZE"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil {
			t.Fatalf("ZGOLDEN_BENCH_WA_SIZE=%q", v)
		}
		c.WASize = n
	}
	if !slices.Contains(c.Sizes, c.WASize) { // it copies a golden tree the create case made
		want := c.WASize
		c.WASize = c.Sizes[0]
		for _, n := range c.Sizes {
			if n <= want {
				c.WASize = n
			}
		}
	}
	if v := os.Getenv("ZGOLDEN_BENCH_CP_REPS"); v != "" {
		f := strings.Split(v, ",")
		for i := range c.CopyReps {
			n, err := strconv.Atoi(strings.TrimSpace(f[min(i, len(f)-1)]))
			if err != nil || n < 1 {
				t.Fatalf("ZGOLDEN_BENCH_CP_REPS=%q", v)
			}
			c.CopyReps[i] = n
		}
	}
	for i := range c.CopyReps {
		c.CopyReps[i] = min(c.CopyReps[i], c.Reps)
	}
	if v := os.Getenv("ZGOLDEN_BENCH_LARGE"); v != "" {
		c.Large = v
	}
	if cnt, size := parseLarge(c.Large); cnt < 0 || size < 0 {
		t.Fatalf("ZGOLDEN_BENCH_LARGE=%q: want COUNTxSIZE, such as 4x256M", c.Large)
	}
	if v := os.Getenv("ZGOLDEN_BENCH_CASES"); v != "" {
		c.Cases = strings.Split(v, ",")
	}
	if v := os.Getenv("ZGOLDEN_BENCH_SCALE"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 10 {
			t.Fatalf("ZGOLDEN_BENCH_SCALE=%q", v)
		}
		c.ScaleVols = n
	}
	if v := os.Getenv("ZGOLDEN_BENCH_REMOVE"); v != "" {
		c.RemoveSizes = strings.Split(v, ",")
	}
	return c
}

// parseLarge parses COUNTxSIZE ("4x256M"); -1, -1 when malformed, 0, 0 for "0".
func parseLarge(s string) (int, int64) {
	if s == "" || s == "0" {
		return 0, 0
	}
	c, sz, ok := strings.Cut(s, "x")
	n, err := strconv.Atoi(c)
	if !ok || err != nil || n < 0 {
		return -1, -1
	}
	size, err := parseBytes(sz)
	if err != nil {
		return -1, -1
	}
	return n, size
}

// parseBytes parses a byte count with an optional K, M or G (binary) suffix.
func parseBytes(s string) (int64, error) {
	mult := int64(1)
	if k := strings.IndexAny(s, "KMG"); k == len(s)-1 && k > 0 {
		mult = map[byte]int64{'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30}[s[k]]
		s = s[:k]
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil || v < 0 {
		return 0, fmt.Errorf("%q is not a byte count such as 0, 100M or 1G", s)
	}
	return v * mult, nil
}

func environment(b bed) Env {
	e := Env{Where: b.where(), Backend: b.backend(), CPUs: runtime.NumCPU(), GoVersion: runtime.Version(),
		LoadStart: loadavg(), Probes: map[string]Stat{}, Notes: map[string]string{}}
	e.Kernel = strings.TrimSpace(first(run("uname", "-r")))
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(data), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				e.CPUModel = strings.TrimSpace(v)
				break
			}
		}
	}
	if data, err := os.ReadFile("/proc/meminfo"); err == nil {
		var kb int
		fmt.Sscanf(strings.SplitN(string(data), "\n", 2)[0], "MemTotal: %d kB", &kb)
		e.MemTotalMB = kb / 1024
	}
	if data, err := os.ReadFile("/sys/module/zfs/version"); err == nil {
		e.ZFSModule = strings.TrimSpace(string(data))
	}
	if b.backend() == "zfs" {
		e.ZFSUserland = strings.SplitN(strings.TrimSpace(first(run("zfs", "version"))), "\n", 2)[0]
	}
	e.XFSProgs = strings.TrimSpace(first(run("mkfs.xfs", "-V")))
	e.Coreutils = strings.SplitN(first(run("cp", "--version")), "\n", 2)[0]
	e.Git = strings.TrimSpace(first(run("git", "--version")))
	if harness.InGuest() {
		e.Notes["emulation"] = "qemu TCG (software emulation; KVM hangs on these machines): compare ratios within this run, not absolute times with the host"
	}
	// Probes: a CPU-bound loop and a process spawn, the same on every machine, so the guest's
	// emulation cost can be read off (the probes' guest/host ratio).
	buf := make([]byte, 16<<20)
	newRNG(1).fill(buf)
	var cpu, spawn []time.Duration
	for i := 0; i < 5; i++ {
		t0 := time.Now()
		sha256.Sum256(buf)
		cpu = append(cpu, time.Since(t0))
	}
	for i := 0; i < 10; i++ {
		t0 := time.Now()
		_ = exec.Command("/bin/true").Run()
		spawn = append(spawn, time.Since(t0))
	}
	e.Probes["sha256 of 16 MiB"] = Summarize(cpu)
	e.Probes["fork+exec /bin/true"] = Summarize(spawn)
	if b.backend() == "zfs" {
		zb := b.(*zfsBed)
		var zget []time.Duration
		for i := 0; i < 10; i++ {
			t0 := time.Now()
			_, _ = run("zfs", "get", "-H", "-o", "value", "name", zb.pool)
			zget = append(zget, time.Since(t0))
		}
		e.Probes["zfs get (one property)"] = Summarize(zget)
	}
	var mnt []time.Duration
	dir, _ := os.MkdirTemp("", "probe")
	for i := 0; i < 5; i++ {
		t0 := time.Now()
		if _, err := run("mount", "-t", "tmpfs", "none", dir); err == nil {
			mnt = append(mnt, time.Since(t0))
			_, _ = run("umount", dir)
		}
	}
	os.Remove(dir)
	e.Probes["mount(8) of a tmpfs"] = Summarize(mnt)
	return e
}

func first(s string, _ error) string { return s }

func loadavg() string {
	data, _ := os.ReadFile("/proc/loadavg")
	return strings.TrimSpace(string(data))
}
