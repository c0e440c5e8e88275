package bench

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// transfer is the fleet's case: what it costs to bring a second host a golden's next
// generation. A receiver plugin on a store of its own (a second host's) first gets generation N
// of the golden of n files in full. A promotion on the sender then makes generation N+1 from a
// volume in which a session changed a little (a 16 MiB file added, 1 % of the files appended
// to), and N+1 goes over as an incremental stream (ZFS only: the reflink store sends whole
// images), as a full stream, and, as the baseline, by rsync -a of N+1's tree: onto a volume of
// generation N on the receiver (what rsync would send a host that has the older tree) and into
// an empty volume. Each method is timed and its bytes counted: the stream's bytes between the
// two zgolden commands, rsync's own "Total bytes sent".
func (bm *bencher) transfer(t *testing.T, n int) {
	b, p := bm.bed, bm.bed.plugin()
	q := b.receiver(t)
	prj := project(n)
	reps := min(bm.cfg.Reps, 3)
	gens := func(pl *plugin) []int {
		var ns []int
		for _, g := range pl.generations(t, prj) {
			ns = append(ns, g.Number)
		}
		return ns
	}
	have := gens(p)
	if len(have) == 0 {
		t.Fatalf("golden %s has no generation", prj)
	}
	base := have[len(have)-1]
	rmOnReceiver := func() {
		t.Helper()
		if len(gens(q)) > 0 {
			if out, err := q.adminCLI("golden", "rm", prj, "--force"); err != nil {
				t.Fatalf("golden rm on the receiver: %v\n%s", err, out)
			}
		}
	}
	type sample struct {
		took  time.Duration
		bytes int64
	}
	samples := map[string][]sample{}
	send := func(method string, args ...string) {
		t.Helper()
		b.settle()
		took, n, err := streamTo(p, q, prj, args...)
		if err != nil {
			t.Fatalf("%s: %v", method, err)
		}
		if method != "" {
			samples[method] = append(samples[method], sample{took, n})
		}
	}
	for r := 0; r < reps; r++ {
		rmOnReceiver()
		send("full send of generation N", "--generation", strconv.Itoa(base))
	}

	// Generation N+1: a session's small change, promoted. A session of generation N stays on
	// the sender, as on a busy host, so the promotion's reclaim keeps N there to send from.
	for _, v := range []string{"xfer-keep", "xfer-src"} {
		if err := p.create(v, map[string]string{"golden": prj}); err != nil {
			t.Fatal(err)
		}
	}
	srcMP, err := p.mount("xfer-src", "bench")
	if err != nil {
		t.Fatal(err)
	}
	changed, err := changeTree(srcMP, 16<<20, 100)
	if err != nil {
		t.Fatalf("change the session's tree: %v", err)
	}
	if out, err := p.adminCLI("golden", "promote", "xfer-src", "--project", prj); err != nil {
		t.Fatalf("promote: %v\n%s", err, out)
	}
	after := gens(p)
	next := after[len(after)-1]

	for r := 0; r < reps; r++ {
		methods := []string{"full send", "rsync -a onto generation N", "rsync -a into an empty volume"}
		if b.backend() == "zfs" {
			methods = append(methods, "incremental send")
		}
		for i := range methods {
			m := methods[(i+r)%len(methods)]
			rmOnReceiver()
			switch m {
			case "incremental send":
				send("", "--generation", strconv.Itoa(base)) // the receiver has N, not N+1
				send(m, "--generation", strconv.Itoa(next), "--since", strconv.Itoa(base))
			case "full send":
				send(m, "--generation", strconv.Itoa(next))
			default:
				opts := map[string]string{}
				if m == "rsync -a onto generation N" {
					send("", "--generation", strconv.Itoa(base))
					opts = map[string]string{"golden": prj, "generation": strconv.Itoa(base)}
				}
				name := fmt.Sprintf("xfer-rsync-%d-%d", r, i)
				if err := q.create(name, opts); err != nil {
					t.Fatal(err)
				}
				dst, err := q.mount(name, "bench")
				if err != nil {
					t.Fatal(err)
				}
				b.settle()
				took, sent, err := rsyncTree(srcMP, dst)
				if err != nil {
					t.Fatal(err)
				}
				samples[m] = append(samples[m], sample{took, sent})
				if err := q.unmount(name, "bench"); err != nil {
					t.Fatal(err)
				}
				if err := q.remove(name); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	if err := p.unmount("xfer-src", "bench"); err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{"xfer-keep", "xfer-src"} {
		if err := p.remove(v); err != nil {
			t.Fatal(err)
		}
	}
	e := Entry{Case: "transfer", Files: n, Param: fmt.Sprintf("generation %d, then %d (%s: a 16 MiB file and %d files appended to)", base, next, "a session's change", changed),
		Methods: map[string]Stat{}, Ratios: map[string]float64{}, Extra: map[string]any{}}
	for m, ss := range samples {
		var ds []time.Duration
		var total int64
		for _, s := range ss {
			ds = append(ds, s.took)
			total += s.bytes
		}
		e.Methods[m] = Summarize(ds)
		e.Extra[m+" bytes"] = total / int64(len(ss))
	}
	inc := "incremental send"
	if _, ok := e.Methods[inc]; !ok {
		inc = "full send" // the reflink store's only way
	}
	for _, m := range []string{"full send", "rsync -a onto generation N", "rsync -a into an empty volume"} {
		if m != inc {
			e.Ratios[m+"/"+inc] = Ratio(e.Methods[m].Median, e.Methods[inc].Median)
		}
	}
	bm.add(e)
	t.Logf("transfer bytes: %v", e.Extra)
}

// streamTo pipes `zgolden golden export prj ARGS` on p into `zgolden golden receive prj` on q
// and returns how long that took and how many bytes crossed.
func streamTo(p, q *plugin, prj string, args ...string) (time.Duration, int64, error) {
	exp := exec.Command(p.bin, append(append([]string{"golden", "export", prj}, args...), "--admin-socket", p.admin)...)
	rcv := exec.Command(q.bin, "golden", "receive", prj, "--admin-socket", q.admin)
	var expErr, rcvOut bytes.Buffer
	exp.Stderr = &expErr
	rcv.Stdout, rcv.Stderr = &rcvOut, &rcvOut
	out, err := exp.StdoutPipe()
	if err != nil {
		return 0, 0, err
	}
	counted := &countReader{r: out}
	rcv.Stdin = counted
	t0 := time.Now()
	if err := exp.Start(); err != nil {
		return 0, 0, err
	}
	rerr := rcv.Run()
	eerr := exp.Wait()
	took := time.Since(t0)
	if rerr != nil || eerr != nil {
		return 0, 0, fmt.Errorf("golden export %s %v | golden receive: %v, %v\n%s%s", prj, args, eerr, rerr, expErr.String(), rcvOut.String())
	}
	return took, counted.n, nil
}

type countReader struct {
	r io.Reader
	n int64
}

func (c *countReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

var rsyncSent = regexp.MustCompile(`(?m)^Total bytes sent: ([0-9,.]+)`)

// rsyncTree runs rsync -a --delete of src's tree into dst and returns its time and the bytes it
// says it sent.
func rsyncTree(src, dst string) (time.Duration, int64, error) {
	t0 := time.Now()
	out, err := exec.Command("rsync", "-a", "-H", "-X", "--delete", "--stats", src+"/", dst+"/").CombinedOutput()
	took := time.Since(t0)
	if err != nil {
		return 0, 0, fmt.Errorf("rsync: %v\n%s", err, out)
	}
	m := rsyncSent.FindSubmatch(out)
	if m == nil {
		return 0, 0, fmt.Errorf("rsync --stats printed no total:\n%s", out)
	}
	n, err := strconv.ParseInt(strings.NewReplacer(",", "", ".", "").Replace(string(m[1])), 10, 64)
	return took, n, err
}

// changeTree makes a session's small change in dir: a new file of size bytes, and a line
// appended to every every-th file of the walk. It returns how many files it appended to.
func changeTree(dir string, size int64, every int) (int, error) {
	data := make([]byte, size)
	newRNG(16).fill(data)
	if err := os.WriteFile(filepath.Join(dir, "session-change.bin"), data, 0o644); err != nil {
		return 0, err
	}
	i, changed := 0, 0
	err := filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() || d.Name() == "session-change.bin" {
			return err
		}
		if i++; i%every != 0 {
			return nil
		}
		f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
		if err != nil {
			return err
		}
		changed++
		_, err = f.WriteString("changed by the session\n")
		return errors.Join(err, f.Close())
	})
	return changed, err
}
