// Command report merges the result lines of bench runs (the host's and the guest's test output,
// see bench.JSONPrefix) into one JSON file, prints a table with the ratios and the goals of
// issue 9, and draws create latency against golden file count on log axes with gnuplot.
//
//	go run ./tests/bench/report -json tests/bench/results/latest.json -png tests/bench/results/create-latency.png LOG...
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/zgolden/zgolden/tests/bench"
)

// Report is tests/bench/results/latest.json.
type Report struct {
	Generated time.Time     `json:"generated"`
	Sources   []string      `json:"sources"`
	Runs      []bench.Run   `json:"runs"` // environment and configuration of each run (entries below)
	Entries   []bench.Entry `json:"entries"`
	Goals     []Goal        `json:"goals"`
}

// Goal is one of issue 9's targets, checked against this report's numbers.
type Goal struct {
	Goal     string `json:"goal"`
	Backend  string `json:"backend"`
	Target   string `json:"target"`
	Measured string `json:"measured"`
	Met      *bool  `json:"met"` // null: not measured in this report
}

func main() {
	jsonOut := flag.String("json", "tests/bench/results/latest.json", "write the merged results here")
	pngOut := flag.String("png", "tests/bench/results/create-latency.png", "draw the plot here (needs gnuplot); empty to skip")
	flag.Parse()
	if flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: report [-json FILE] [-png FILE] LOG...")
		os.Exit(2)
	}
	r := Report{Generated: time.Now().UTC()}
	for _, path := range flag.Args() {
		if err := r.read(path); err != nil {
			fmt.Fprintf(os.Stderr, "report: %s: %v\n", path, err)
			os.Exit(1)
		}
	}
	if len(r.Entries) == 0 {
		fmt.Fprintln(os.Stderr, "report: no results in", strings.Join(flag.Args(), ", "))
		os.Exit(1)
	}
	r.goals()
	r.print(os.Stdout)
	if err := os.MkdirAll(filepath.Dir(*jsonOut), 0o755); err != nil {
		fatal(err)
	}
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		fatal(err)
	}
	if err := os.WriteFile(*jsonOut, append(data, '\n'), 0o644); err != nil {
		fatal(err)
	}
	fmt.Printf("\nresults: %s\n", *jsonOut)
	if *pngOut != "" {
		switch err := r.plot(*pngOut); {
		case errors.Is(err, errNothingToPlot): // a run of other cases alone (ZGOLDEN_BENCH_CASES=load)
			fmt.Printf("plot:    none (%v)\n", err)
		case err != nil:
			fmt.Fprintf(os.Stderr, "report: plot: %v\n", err)
			os.Exit(1)
		default:
			fmt.Printf("plot:    %s\n", *pngOut)
		}
	}
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "report:", err)
	os.Exit(1)
}

// read collects the result lines of one log.
func (r *Report) read(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	r.Sources = append(r.Sources, path)
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	var env *bench.Env
	var entries []bench.Entry
	var run *bench.Run
	for sc.Scan() {
		line := sc.Text()
		i := strings.Index(line, bench.JSONPrefix)
		if i < 0 {
			continue
		}
		var msg struct {
			Type  string       `json:"type"`
			Env   *bench.Env   `json:"env"`
			Entry *bench.Entry `json:"entry"`
			Run   *bench.Run   `json:"run"`
		}
		if err := json.Unmarshal([]byte(line[i+len(bench.JSONPrefix):]), &msg); err != nil {
			return fmt.Errorf("bad result line: %v", err)
		}
		switch {
		case msg.Env != nil:
			env = msg.Env
		case msg.Entry != nil:
			entries = append(entries, *msg.Entry)
		case msg.Run != nil:
			run = msg.Run
		}
	}
	if err := sc.Err(); err != nil {
		return err
	}
	if run == nil { // cut short: keep what it measured, say so
		run = &bench.Run{}
		if env != nil {
			run.Env = *env
		}
		if run.Env.Notes == nil {
			run.Env.Notes = map[string]string{}
		}
		run.Env.Notes["incomplete"] = "this run did not finish; its entries are what it measured before it stopped"
	}
	run.Entries = nil
	r.Runs = append(r.Runs, *run)
	r.Entries = append(r.Entries, entries...)
	return nil
}

func (r *Report) find(c, backend string, files int) *bench.Entry {
	var found *bench.Entry
	for i := range r.Entries {
		e := &r.Entries[i]
		if e.Case == c && e.Backend == backend && (files < 0 || e.Files == files) {
			found = e // the last one wins, if a log holds two runs
		}
	}
	return found
}

func (r *Report) backends() []string {
	seen := map[string]bool{}
	var out []string
	for _, e := range r.Entries {
		if !seen[e.Backend] {
			seen[e.Backend] = true
			out = append(out, e.Backend)
		}
	}
	sort.Strings(out)
	return out
}

// createSizes returns the file counts with a create_mount entry for backend, ascending.
func (r *Report) createSizes(backend string) []int {
	seen := map[int]bool{}
	var out []int
	for _, e := range r.Entries {
		if e.Case == "create_mount" && e.Backend == backend && !seen[e.Files] {
			seen[e.Files] = true
			out = append(out, e.Files)
		}
	}
	sort.Ints(out)
	return out
}

func yes(b bool) *bool { return &b }

func (r *Report) goals() {
	ratioGoal := func(backend string, files int, min float64) {
		g := Goal{Goal: fmt.Sprintf("create+mount from a %s-file golden vs cp -a --reflink=auto", count(files)), Backend: backend, Target: fmt.Sprintf(">= %.0fx", min)}
		if e := r.find("create_mount", backend, files); e != nil {
			v := e.Ratios["cp/plugin"]
			g.Measured, g.Met = fmt.Sprintf("%.1fx (cp %.0f ms, plugin %.1f ms)", v, e.Methods["cp"].Median, e.Methods["plugin"].Median), yes(v >= min)
		} else {
			g.Measured = "not measured"
		}
		r.Goals = append(r.Goals, g)
	}
	ratioGoal("zfs", 100000, 100)
	ratioGoal("reflink", 100000, 40)
	ratioGoal("reflink", 1000000, 400)
	for _, b := range r.backends() {
		sizes := r.createSizes(b)
		if len(sizes) >= 2 {
			lo, hi := r.find("create_mount", b, sizes[0]), r.find("create_mount", b, sizes[len(sizes)-1])
			v := bench.Ratio(hi.Methods["plugin"].Median, lo.Methods["plugin"].Median)
			r.Goals = append(r.Goals, Goal{Goal: fmt.Sprintf("create+mount flat in file count (%s -> %s files)", count(sizes[0]), count(sizes[len(sizes)-1])),
				Backend: b, Target: "<= 1.3x", Measured: fmt.Sprintf("%.2fx (%.1f ms -> %.1f ms)", v, lo.Methods["plugin"].Median, hi.Methods["plugin"].Median), Met: yes(v <= 1.3)})
		}
		worst, at := 0.0, 0
		var all []string
		for _, n := range sizes {
			v := r.find("create_mount", b, n).Ratios["plugin/raw"]
			all = append(all, fmt.Sprintf("%s: %.2fx", count(n), v))
			if v > worst {
				worst, at = v, n
			}
		}
		if len(sizes) > 0 {
			r.Goals = append(r.Goals, Goal{Goal: "plugin overhead over the raw command sequence (worst file count)", Backend: b, Target: "<= 1.3x",
				Measured: fmt.Sprintf("%.2fx at %s files (%s)", worst, count(at), strings.Join(all, ", ")), Met: yes(worst <= 1.3)})
		}
	}
	g := Goal{Goal: "DDT entries after zgolden creates", Backend: "zfs", Target: "0", Measured: "not measured"}
	if e := r.find("write_amplification", "zfs", -1); e != nil {
		if v, ok := e.Extra["plugin_ddt_entries"].(float64); ok {
			g.Measured, g.Met = fmt.Sprintf("%.0f", v), yes(v == 0)
		}
	}
	r.Goals = append(r.Goals, g)
}

func count(n int) string {
	switch {
	case n >= 1000000 && n%1000000 == 0:
		return fmt.Sprintf("%dM", n/1000000)
	case n >= 1000 && n%1000 == 0:
		return fmt.Sprintf("%dk", n/1000)
	}
	return fmt.Sprint(n)
}

func ms(s bench.Stat) string {
	if s.N == 0 {
		return "-"
	}
	f := func(v float64) string {
		switch {
		case v >= 10000:
			return fmt.Sprintf("%.1fs", v/1000)
		case v >= 100:
			return fmt.Sprintf("%.0f", v)
		default:
			return fmt.Sprintf("%.1f", v)
		}
	}
	return fmt.Sprintf("%s / %s", f(s.Median), f(s.P99))
}

func (r *Report) print(w *os.File) {
	for _, run := range r.Runs {
		e := run.Env
		fmt.Fprintf(w, "== %s backend on %s: kernel %s, %d CPUs (%s), %d MiB", e.Backend, e.Where, e.Kernel, e.CPUs, e.CPUModel, e.MemTotalMB)
		if e.ZFSModule != "" {
			fmt.Fprintf(w, ", zfs %s (%s)", e.ZFSModule, e.ZFSUserland)
		}
		fmt.Fprintf(w, "\n   %s, %s; load %s -> %s\n", e.XFSProgs, e.Coreutils, e.LoadStart, e.LoadEnd)
		var probes []string
		for _, k := range sortedKeys(e.Probes) {
			probes = append(probes, fmt.Sprintf("%s %.1f ms", k, e.Probes[k].Median))
		}
		fmt.Fprintf(w, "   probes: %s\n", strings.Join(probes, "; "))
		for k, v := range e.Notes {
			fmt.Fprintf(w, "   %s: %s\n", k, v)
		}
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	for _, b := range r.backends() {
		fmt.Fprintf(w, "\n== Create + first Mount, %s backend (median / p99 ms)\n", b)
		fmt.Fprintln(tw, "files\tzgolden plugin\traw sequence\tcp -a --reflink=auto\tcp / plugin\tcp / raw\tplugin / raw\t")
		for _, n := range r.createSizes(b) {
			e := r.find("create_mount", b, n)
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%.0fx\t%.0fx\t%.2fx\t\n", count(n), ms(e.Methods["plugin"]), ms(e.Methods["raw"]), ms(e.Methods["cp"]),
				e.Ratios["cp/plugin"], e.Ratios["cp/raw"], e.Ratios["plugin/raw"])
		}
		tw.Flush()
		if sizes := r.createSizes(b); len(sizes) > 1 {
			lo, hi := r.find("create_mount", b, sizes[0]), r.find("create_mount", b, sizes[len(sizes)-1])
			fmt.Fprintf(w, "growth %s -> %s files (%.0fx the files): plugin %.2fx, raw %.2fx, cp %.1fx\n", count(sizes[0]), count(sizes[len(sizes)-1]),
				float64(sizes[len(sizes)-1])/float64(sizes[0]),
				bench.Ratio(hi.Methods["plugin"].Median, lo.Methods["plugin"].Median), bench.Ratio(hi.Methods["raw"].Median, lo.Methods["raw"].Median),
				bench.Ratio(hi.Methods["cp"].Median, lo.Methods["cp"].Median))
		}
		for _, c := range []string{"import", "remove", "concurrency", "workspace", "scale", "transfer"} {
			var rows []bench.Entry
			for _, e := range r.Entries {
				if e.Case == c && e.Backend == b {
					rows = append(rows, e)
				}
			}
			if len(rows) == 0 {
				continue
			}
			fmt.Fprintf(w, "\n-- %s (%s; median / p99 ms)\n", c, b)
			for _, e := range rows {
				label := e.Param
				if e.Files > 0 {
					label = strings.TrimSpace(count(e.Files) + " files " + label)
				}
				fmt.Fprintf(w, "   %s\n", label)
				for _, m := range sortedKeys(e.Methods) {
					moved := ""
					if v, ok := e.Extra[m+" bytes"].(float64); ok { // the transfer case's bytes moved
						moved = fmt.Sprintf("%.1f MB", v/1e6)
					}
					fmt.Fprintf(tw, "      %s\t%s\t(n=%d)\t%s\t\n", m, ms(e.Methods[m]), e.Methods[m].N, moved)
				}
				tw.Flush()
				for _, k := range sortedKeys(e.Ratios) {
					fmt.Fprintf(w, "      ratio %s = %.2fx\n", k, e.Ratios[k])
				}
				if c == "scale" {
					fmt.Fprintf(w, "      plugin RSS %v KiB (empty %v KiB, peak %v KiB, after restart %v KiB)\n", e.Extra["rss_kib"], e.Extra["rss_kib_empty"], e.Extra["rss_peak_kib"], e.Extra["rss_kib_after_restart"])
				}
			}
		}
		if e := r.find("write_amplification", b, -1); e != nil {
			fmt.Fprintf(w, "\n-- write amplification and dedup (%s, %s files)\n", b, count(e.Files))
			keys := sortedKeys(e.Extra)
			for _, k := range keys {
				if strings.HasPrefix(k, "plugin_") && k != "plugin_bytes_written_median" && k != "plugin_ddt_entries" {
					continue
				}
				data, _ := json.Marshal(e.Extra[k])
				fmt.Fprintf(w, "   %s: %s\n", k, data)
			}
			for _, k := range sortedKeys(e.Ratios) {
				fmt.Fprintf(w, "   ratio %s = %.1fx\n", k, e.Ratios[k])
			}
		}
	}
	fmt.Fprintf(w, "\n== Goals (issue 9)\n")
	gw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(gw, "met\tbackend\tgoal\ttarget\tmeasured")
	for _, g := range r.Goals {
		met := "n/a"
		if g.Met != nil {
			met = map[bool]string{true: "yes", false: "NO"}[*g.Met]
		}
		fmt.Fprintf(gw, "%s\t%s\t%s\t%s\t%s\n", met, g.Backend, g.Goal, g.Target, g.Measured)
	}
	gw.Flush()
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// plot draws create+mount latency against golden file count, one line per method and backend,
// both axes logarithmic, with gnuplot.
// errNothingToPlot: the run has no create+mount results, so there is no latency plot to draw.
var errNothingToPlot = errors.New("no create+mount results to plot")

func (r *Report) plot(out string) error {
	gp, err := exec.LookPath("gnuplot")
	if err != nil {
		return fmt.Errorf("gnuplot is not installed (tests/setup/host-deps.sh installs gnuplot-nox)")
	}
	where := map[string]string{}
	for _, run := range r.Runs {
		where[run.Env.Backend] = run.Env.Where
	}
	var script bytes.Buffer
	script.WriteString("set terminal pngcairo size 1100,700 font 'sans,11'\n")
	fmt.Fprintf(&script, "set output %q\n", out)
	script.WriteString(`set title "zgolden: Create + first Mount from a golden, against copying it (median, error bars to p99)"
set xlabel "files in the golden"
set ylabel "milliseconds (log scale)"
set logscale xy
set format x "10^{%L}"
set format y "10^{%L}"
set grid xtics ytics mxtics mytics lc rgb "#dddddd"
set key top left box opaque
set xrange [*:*]
`)
	type series struct{ title, data, style string }
	var all []series
	methods := []struct{ key, label, color string }{{"plugin", "zgolden plugin", "#1b9e77"}, {"raw", "raw sequence, no plugin", "#7570b3"}, {"cp", "cp -a --reflink=auto", "#d95f02"}}
	for _, b := range r.backends() {
		dash := "1"
		if b == "reflink" {
			dash = "2"
		}
		for _, m := range methods {
			var d strings.Builder
			for _, n := range r.createSizes(b) {
				s := r.find("create_mount", b, n).Methods[m.key]
				if s.N > 0 {
					fmt.Fprintf(&d, "%d %g %g %g\n", n, s.Median, s.Min, s.P99)
				}
			}
			if d.Len() == 0 {
				continue
			}
			w := where[b]
			if w == "" {
				w = "?"
			}
			all = append(all, series{fmt.Sprintf("%s (%s, %s)", m.label, b, w), d.String(),
				fmt.Sprintf("lc rgb %q dt %s lw 2 pt 7 ps 1", m.color, dash)})
		}
	}
	if len(all) == 0 {
		return errNothingToPlot
	}
	for i, s := range all {
		fmt.Fprintf(&script, "$d%d << EOD\n%sEOD\n", i, s.data)
	}
	script.WriteString("plot ")
	for i, s := range all {
		if i > 0 {
			script.WriteString(", \\\n     ")
		}
		fmt.Fprintf(&script, "$d%d using 1:2:2:4 with yerrorlines %s title %q", i, s.style, s.title)
	}
	script.WriteString("\n")
	cmd := exec.Command(gp)
	cmd.Stdin = &script
	if o, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("gnuplot: %v\n%s\nscript:\n%s", err, o, script.String())
	}
	return nil
}
