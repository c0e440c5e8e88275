package bench

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/zgolden/zgolden/xfsutil"
)

// ---- what the plugin's paths are made of, timed in each load phase -------------------------
//
// Under load the plugin's Create, Mount, Unmount and Remove (with spares) run no zfs command;
// what is left is the request itself, fsyncs of small records and bind mounts. These probes time
// each of those alone, in the same phase, so that a slow call can be put down to the part that
// got slow, and the plugin's own log gives each call's time inside the server (against the time
// the bench saw over the socket).

// primitiveProbes times each primitive reps times; dir must be on the filesystem of the plugin's
// records.
func (p *plugin) primitiveProbes(dir string, zfsTarget string, reps int) map[string]Stat {
	out := map[string]Stat{}
	timeIt := func(name string, f func() error) {
		var ds []time.Duration
		for i := 0; i < reps; i++ {
			t0 := time.Now()
			if err := f(); err != nil {
				p.t.Logf("probe %s: %v", name, err)
				return
			}
			ds = append(ds, time.Since(t0))
		}
		out[name] = Summarize(ds)
	}
	timeIt("request that does no work (Capabilities)", func() error { return p.call("Capabilities", struct{}{}, nil) })
	rec := filepath.Join(dir, "probe-records")
	timeIt("record: write, fsync, rename, fsync dir", func() error {
		return writeDurable(filepath.Join(rec, "probe.json"), []byte(`{"name":"probe"}`))
	})
	// The same few bytes, overwritten in place in a file whose block is already written: a
	// datasync that changes no metadata, so the filesystem's journal is not committed.
	slot := filepath.Join(rec, "slots")
	if f, err := os.OpenFile(slot, os.O_CREATE|os.O_RDWR, 0o600); err == nil {
		if _, err := f.WriteAt(make([]byte, 4096), 0); err == nil && f.Sync() == nil {
			timeIt("record: overwrite in place, fdatasync", func() error {
				if _, err := f.WriteAt([]byte(`{"name":"probe"}`), 0); err != nil {
					return err
				}
				return unix.Fdatasync(int(f.Fd()))
			})
		}
		f.Close()
	}
	src, dst := filepath.Join(rec, "bind-src"), filepath.Join(rec, "bind-dst")
	if os.MkdirAll(src, 0o755) == nil && os.MkdirAll(dst, 0o755) == nil {
		timeIt("bind mount, then umount", func() error {
			if err := unix.Mount(src, dst, "", unix.MS_BIND, ""); err != nil {
				return err
			}
			return unix.Unmount(dst, 0)
		})
	}
	timeIt("fork+exec /bin/true", func() error { return exec.Command("/bin/true").Run() })
	if zfsTarget != "" {
		timeIt("zfs get (one property)", func() error {
			return exec.Command("zfs", "get", "-H", "-o", "value", "name", zfsTarget).Run()
		})
	}
	return out
}

// serverTimes reads the plugin's log for its own time of each call on the volumes whose names
// start with prefix: call -> durations. The plugin logs every request at debug level.
func (p *plugin) serverTimes(prefix string) map[string][]time.Duration {
	out := map[string][]time.Duration{}
	for _, r := range p.requestsDone(prefix) {
		out[r.call] = append(out[r.call], r.took)
	}
	return out
}

// doneLine is one "request done" line of the plugin's log.
type doneLine struct {
	call, volume string
	took         time.Duration
	end          time.Time // the line's time: the handler's end, just before the reply is written
}

// requestsDone reads the plugin's log for the "request done" lines of the volumes whose names
// start with prefix.
func (p *plugin) requestsDone(prefix string) []doneLine {
	f, err := os.Open(p.logPath)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []doneLine
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.Contains(line, `msg="request done"`) {
			continue
		}
		m := requestDone.FindStringSubmatch(line)
		if m == nil || !strings.HasPrefix(m[3], prefix) {
			continue
		}
		took, err := time.ParseDuration(m[2])
		if err != nil {
			continue
		}
		r := doneLine{call: m[1], volume: m[3], took: took}
		if tm := logTime.FindStringSubmatch(line); tm != nil {
			r.end, _ = time.Parse(time.RFC3339Nano, tm[1])
		}
		out = append(out, r)
	}
	return out
}

var requestDone = regexp.MustCompile(`call=(\w+) .*took=([0-9.]+[a-zµ]+) .*volume=(\S+)`)

// logTime is the timestamp of a plugin log line (plugin/serve.go's format).
var logTime = regexp.MustCompile(`time="([^"]+)"`)

// outsideTimes splits the time the bench saw of each call on the volumes whose names start with
// prefix into what the plugin's handler took and what it did not: "before" runs from the
// request's send to the handler's start (the plugin's log line time less its took), "after" from
// the handler's end (the log line's time, just before the reply is written) to the reply read. A
// call that waits for a CPU, or for the plugin's process to be scheduled, shows it here and not
// in the plugin's own time. The log's times are to the millisecond, so each figure is within
// about 2 ms. call -> "before"|"after" -> durations.
func (p *plugin) outsideTimes(prefix string) map[string]map[string][]time.Duration {
	type span struct{ start, end time.Time }
	spans := map[string]span{} // call + " " + volume
	for _, r := range p.requestsDone(prefix) {
		if !r.end.IsZero() {
			spans[r.call+" "+r.volume] = span{r.end.Add(-r.took), r.end}
		}
	}
	out := map[string]map[string][]time.Duration{}
	p.callsMu.Lock()
	defer p.callsMu.Unlock()
	for _, c := range p.calls {
		s, ok := spans[c.call+" "+c.volume] // only the prefix's volumes have spans
		if !ok {
			continue
		}
		if out[c.call] == nil {
			out[c.call] = map[string][]time.Duration{}
		}
		out[c.call]["before"] = append(out[c.call]["before"], s.start.Sub(c.sent))
		out[c.call]["after"] = append(out[c.call]["after"], c.replied.Sub(s.end))
	}
	return out
}

// createdFrom reads the plugin's log for how each Create of a volume whose name starts with
// prefix was served: "waited" for a spare being made (ZFS), "spare" for a ready spare claimed
// (ZFS: its source is under PARENT/spare), and "other" for the rest: a clone, or on the reflink
// store any Create, whose source does not say.
func (p *plugin) createdFrom(prefix string) map[string]int {
	data, err := os.ReadFile(p.logPath)
	if err != nil {
		return nil
	}
	waited := map[string]bool{}
	source := map[string]string{}
	for _, line := range strings.Split(string(data), "\n") {
		v := logVolume.FindStringSubmatch(line)
		if v == nil || !strings.HasPrefix(v[1], prefix) {
			continue
		}
		switch {
		case strings.Contains(line, `msg="waited for a spare being made"`):
			waited[v[1]] = true
		case strings.Contains(line, `msg="volume created"`):
			if src := logSource.FindStringSubmatch(line); src != nil {
				source[v[1]] = src[1]
			}
		}
	}
	out := map[string]int{}
	for vol, src := range source {
		switch {
		case waited[vol]:
			out["waited"]++
		case strings.Contains(src, "/spare/"):
			out["spare"]++
		default:
			out["other"]++
		}
	}
	return out
}

var (
	logVolume = regexp.MustCompile(` volume=(\S+)`)
	logSource = regexp.MustCompile(` source=(\S+)`)
)

// traceLog prints the plugin's log lines about the volumes whose names start with prefix, and
// the spare worker's, when ZGOLDEN_BENCH_TRACE=1: where a slow call spent its time.
func (p *plugin) traceLog(prefix string) {
	if os.Getenv("ZGOLDEN_BENCH_TRACE") != "1" {
		return
	}
	data, err := os.ReadFile(p.logPath)
	if err != nil {
		return
	}
	for _, line := range strings.Split(string(data), "\n") {
		if strings.Contains(line, "volume="+prefix) || strings.Contains(line, "made a spare") {
			p.t.Log(line)
		}
	}
}

// writeDurable writes a record as its own file, durably: a temporary file, its fsync, a rename
// and the directory's fsync, the way the records were written before internal/recordfile.
func writeDurable(path string, data []byte) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		return err
	}
	return xfsutil.SyncDir(dir)
}
