// Package bench measures zgolden against what users do today (issue 9, and issue 8's workspace
// case): Create plus first Mount through the plugin's socket against `cp -a --reflink=auto` of
// the same tree and against the raw command sequence without the plugin; Remove latency; write
// amplification and dedup-table entries; concurrent Creates; and 500 volumes (List, RSS,
// restart-to-ready). The measurements live in bench_test.go and run only with ZGOLDEN_BENCH=1
// (`make bench`); this file holds the result format they share with the report command
// (./tests/bench/report), which merges the host's and the guest's runs into
// tests/bench/results/latest.json, prints the table and draws the plot.
package bench

import (
	"math"
	"sort"
	"time"
)

// JSONPrefix starts every result line a bench run prints, so that the host can pick the guest's
// results out of the test output that tests/vm/run.sh brings back.
const JSONPrefix = "ZGBENCH-JSON "

// Run is one bench run: one backend on one machine.
type Run struct {
	Env      Env       `json:"environment"`
	Started  time.Time `json:"started"`
	Finished time.Time `json:"finished"`
	Entries  []Entry   `json:"entries"`
	Config   Config    `json:"config"`
}

// Config is what the run was asked to measure.
type Config struct {
	Sizes       []int    `json:"golden_file_counts"`
	Reps        int      `json:"reps_fast_methods"`
	CopyReps    []int    `json:"reps_copy_per_size"`
	Large       string   `json:"large_files"`
	Cases       []string `json:"cases"`
	ScaleVols   int      `json:"scale_volumes"`
	WASize      int      `json:"write_amplification_files"`
	RemoveSizes []string `json:"remove_written"`
}

// Env records the facts a reader needs to judge the numbers.
type Env struct {
	Where       string            `json:"where"` // "host" or "guest (qemu TCG)"
	Backend     string            `json:"backend"`
	Kernel      string            `json:"kernel"`
	CPUs        int               `json:"cpus"`
	CPUModel    string            `json:"cpu_model"`
	MemTotalMB  int               `json:"mem_total_mb"`
	ZFSModule   string            `json:"zfs_module,omitempty"`
	ZFSUserland string            `json:"zfs_userland,omitempty"`
	XFSProgs    string            `json:"xfsprogs"`
	Coreutils   string            `json:"coreutils"`
	Git         string            `json:"git,omitempty"`
	GoVersion   string            `json:"go"`
	LoadStart   string            `json:"loadavg_start"`
	LoadEnd     string            `json:"loadavg_end"`
	Probes      map[string]Stat   `json:"probes"` // CPU and process-spawn costs, to compare machines
	Notes       map[string]string `json:"notes,omitempty"`
}

// Entry is one measured case at one parameter: every method's latency and the ratios between them.
type Entry struct {
	Case    string          `json:"case"`
	Backend string          `json:"backend"`
	Where   string          `json:"where"`
	Files   int             `json:"files,omitempty"` // the golden's file count, when the case has one
	Param   string          `json:"param,omitempty"`
	Methods map[string]Stat `json:"methods"`
	// Ratios are "A/B": how many times A's median is B's.
	Ratios map[string]float64 `json:"ratios,omitempty"`
	Extra  map[string]any     `json:"extra,omitempty"`
}

// Stat summarises one method's samples, in milliseconds.
type Stat struct {
	N       int       `json:"n"`
	Median  float64   `json:"median_ms"`
	P99     float64   `json:"p99_ms"`
	Min     float64   `json:"min_ms"`
	Max     float64   `json:"max_ms"`
	Mean    float64   `json:"mean_ms"`
	Samples []float64 `json:"samples_ms,omitempty"`
}

// Summarize computes a Stat from durations. p99 is the nearest-rank percentile: with fewer than
// 100 samples it is the largest one.
func Summarize(ds []time.Duration) Stat {
	ms := make([]float64, len(ds))
	for i, d := range ds {
		ms[i] = float64(d.Microseconds()) / 1000
	}
	return SummarizeMs(ms)
}

// SummarizeMs is Summarize for samples already in milliseconds.
func SummarizeMs(ms []float64) Stat {
	if len(ms) == 0 {
		return Stat{}
	}
	s := append([]float64(nil), ms...)
	sort.Float64s(s)
	sum := 0.0
	for _, v := range s {
		sum += v
	}
	return Stat{
		N: len(s), Median: round3(Percentile(s, 50)), P99: round3(Percentile(s, 99)),
		Min: round3(s[0]), Max: round3(s[len(s)-1]), Mean: round3(sum / float64(len(s))),
		Samples: roundAll(ms),
	}
}

// Percentile of sorted samples: the median interpolates between the middle two, other
// percentiles are nearest-rank.
func Percentile(sorted []float64, p float64) float64 {
	n := len(sorted)
	if n == 0 {
		return math.NaN()
	}
	if p == 50 {
		if n%2 == 1 {
			return sorted[n/2]
		}
		return (sorted[n/2-1] + sorted[n/2]) / 2
	}
	rank := int(math.Ceil(p / 100 * float64(n)))
	return sorted[min(max(rank, 1), n)-1]
}

// Ratio is a/b rounded for reading, or 0 when b is 0.
func Ratio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return round3(a / b)
}

func round3(v float64) float64 { return math.Round(v*1000) / 1000 }

func roundAll(v []float64) []float64 {
	out := make([]float64, len(v))
	for i, x := range v {
		out[i] = round3(x)
	}
	return out
}
