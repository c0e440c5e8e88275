package bench

import (
	"encoding/binary"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

// treeSpec describes a generated golden: a Docker data directory (/var/lib/docker with overlay2)
// of about Files entries, deterministic for a given spec, so every method of a run copies the
// same data.
type treeSpec struct {
	Files      int   // entries to make: files, directories and symlinks, the root excluded
	LargeCount int   // large files (image blobs, big shared libraries), on top of Files
	LargeSize  int64 // bytes each
}

// treeStats is what a generated tree holds.
type treeStats struct {
	Entries, Files, Dirs, Symlinks, Hardlinks int64
	Bytes                                     int64
}

// rng is a small deterministic generator (xorshift64*): the tree must be the same for every
// method and every run with the same spec, and math/rand's streams are not promised stable.
type rng struct{ s uint64 }

func newRNG(seed uint64) *rng { return &rng{s: seed*0x9E3779B97F4A7C15 + 0x1234567} }

func (r *rng) next() uint64 {
	r.s ^= r.s >> 12
	r.s ^= r.s << 25
	r.s ^= r.s >> 27
	return r.s * 2685821657736338717
}

func (r *rng) intn(n int) int { return int(r.next() % uint64(n)) }

func (r *rng) float() float64 { return float64(r.next()>>11) / (1 << 53) }

// fill writes pseudo-random bytes: incompressible, so lz4 does not make the data vanish.
func (r *rng) fill(b []byte) {
	i := 0
	for ; i+8 <= len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.next())
	}
	for ; i < len(b); i++ {
		b[i] = byte(r.next())
	}
}

// smallSize draws a file size from a mix like a Docker image layer's: mostly small sources,
// configs and .pyc files, some larger modules, a few shared objects (mean about 3.5 KiB).
func (r *rng) smallSize() int {
	u := r.float()
	logU := func(lo, hi float64) int { return int(lo * math.Pow(hi/lo, r.float())) }
	switch {
	case u < 0.80:
		return logU(64, 4096)
	case u < 0.98:
		return logU(4096, 16384)
	default:
		return logU(16384, 131072)
	}
}

var dirNames = []string{"usr", "lib", "share", "python3.11", "site-packages", "node_modules", "src", "include",
	"etc", "bin", "locale", "doc", "man", "__pycache__", "dist", "build", "tests", "internal", "vendor", "pkg",
	"x86_64-linux-gnu", "perl5", "go", "modules", "cache", "apt", "lists", "var", "opt", "app"}

var fileExts = []string{".py", ".pyc", ".js", ".json", ".h", ".so", ".txt", ".md", ".conf", ".go", ".mo", ".gz", ".c", ".rb", ".html", ""}

func hexID(r *rng) string {
	var b [32]byte
	for i := 0; i < 32; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.next())
	}
	return fmt.Sprintf("%x", b)
}

// generateTree writes the tree into dst (created), using every CPU, and returns what it made.
// Layout, as dockerd's overlay2 keeps it: overlay2/<id>/{diff/...,work/,link,lower},
// overlay2/l/<short> -> ../<id>/diff, image/overlay2/layerdb/sha256/<id>/{cache-id,diff,size},
// and in each layer's diff a nested tree of small files with symlinks, a few hard links and
// overlay's opaque-directory xattr on some directories.
func generateTree(dst string, spec treeSpec) (treeStats, error) {
	var st treeStats
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return st, err
	}
	layers := max(1, spec.Files/3000)
	// Fixed entries: overlay2, overlay2/l, image, image/overlay2, layerdb, sha256 (6), and per
	// layer: dir, diff, work, link, lower, l/short, layerdb dir + 3 files (10).
	fixed := 6 + 10*layers
	budget := spec.Files - fixed
	if budget < layers {
		return st, fmt.Errorf("golden of %d files is too small for %d layers", spec.Files, layers)
	}
	for _, d := range []string{"overlay2/l", "image/overlay2/layerdb/sha256"} {
		if err := os.MkdirAll(filepath.Join(dst, d), 0o755); err != nil {
			return st, err
		}
	}
	st.Dirs += 6
	st.Entries += 6
	var mu sync.Mutex
	add := func(s treeStats) {
		mu.Lock()
		defer mu.Unlock()
		st.Entries += s.Entries
		st.Files += s.Files
		st.Dirs += s.Dirs
		st.Symlinks += s.Symlinks
		st.Hardlinks += s.Hardlinks
		st.Bytes += s.Bytes
	}
	var next atomic.Int64
	var firstErr error
	var errOnce sync.Once
	var wg sync.WaitGroup
	for w := 0; w < max(2, 2*numCPU()); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				l := int(next.Add(1)) - 1
				if l >= layers {
					return
				}
				n := budget / layers
				if l < budget%layers {
					n++
				}
				s, err := generateLayer(dst, l, n)
				if err != nil {
					errOnce.Do(func() { firstErr = err })
					return
				}
				add(s)
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return st, firstErr
	}
	// Large files: a couple of big shared libraries and image blobs in the first layers' diffs.
	buf := make([]byte, 1<<20)
	for i := 0; i < spec.LargeCount; i++ {
		r := newRNG(uint64(1_000_000 + i))
		dir := filepath.Join(dst, "overlay2", layerID(i%layers), "diff")
		f, err := os.Create(filepath.Join(dir, fmt.Sprintf("large-%02d.bin", i)))
		if err != nil {
			return st, err
		}
		for left := spec.LargeSize; left > 0; left -= int64(len(buf)) {
			r.fill(buf)
			if _, err := f.Write(buf[:min(int64(len(buf)), left)]); err != nil {
				f.Close()
				return st, err
			}
		}
		if err := f.Close(); err != nil {
			return st, err
		}
		st.Entries++
		st.Files++
		st.Bytes += spec.LargeSize
	}
	return st, nil
}

func layerID(l int) string { return hexID(newRNG(uint64(l) + 7)) }

func numCPU() int {
	n := 0
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		n = strings.Count(string(data), "\nprocessor")
		if strings.HasPrefix(string(data), "processor") {
			n++
		}
	}
	return max(n, 1)
}

// generateLayer makes one overlay2 layer whose diff holds n entries.
func generateLayer(root string, l, n int) (treeStats, error) {
	var st treeStats
	r := newRNG(uint64(l) + 1)
	id := layerID(l)
	short := strings.ToUpper(id[:26])
	ldir := filepath.Join(root, "overlay2", id)
	diff := filepath.Join(ldir, "diff")
	for _, d := range []string{diff, filepath.Join(ldir, "work")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return st, err
		}
	}
	if err := os.WriteFile(filepath.Join(ldir, "link"), []byte(short), 0o644); err != nil {
		return st, err
	}
	lower := ""
	for i := l - 1; i >= 0 && i >= l-4; i-- {
		if lower != "" {
			lower += ":"
		}
		lower += "l/" + strings.ToUpper(layerID(i)[:26])
	}
	if err := os.WriteFile(filepath.Join(ldir, "lower"), []byte(lower), 0o644); err != nil {
		return st, err
	}
	if err := os.Symlink("../"+id+"/diff", filepath.Join(root, "overlay2", "l", short)); err != nil {
		return st, err
	}
	db := filepath.Join(root, "image/overlay2/layerdb/sha256", hexID(r))
	if err := os.Mkdir(db, 0o755); err != nil {
		return st, err
	}
	for _, f := range [][2]string{{"cache-id", id}, {"diff", "sha256:" + hexID(r)}, {"size", strconv.Itoa(r.intn(1 << 30))}} {
		if err := os.WriteFile(filepath.Join(db, f[0]), []byte(f[1]), 0o644); err != nil {
			return st, err
		}
	}
	st.Entries += 10
	st.Dirs += 4
	st.Files += 5
	st.Symlinks++

	// The diff: a nested tree grown by picking a directory (recent ones more often, as package
	// trees are), and adding a subdirectory, a symlink, a hard link or a file to it.
	dirs := []string{diff}
	depth := map[string]int{diff: 0}
	var files []string
	buf := make([]byte, 131072)
	for i := 0; i < n; i++ {
		var parent string
		if k := r.intn(4); k == 0 || len(dirs) < 4 {
			parent = dirs[r.intn(len(dirs))]
		} else {
			parent = dirs[len(dirs)-1-r.intn(min(len(dirs), 8))]
		}
		u := r.float()
		switch {
		case u < 0.13 && depth[parent] < 7:
			p := filepath.Join(parent, fmt.Sprintf("%s%d", dirNames[r.intn(len(dirNames))], i))
			if err := os.Mkdir(p, 0o755); err != nil {
				return st, err
			}
			if r.intn(100) == 0 { // a directory a later layer made opaque
				if err := unix.Lsetxattr(p, "trusted.overlay.opaque", []byte("y"), 0); err != nil && err != unix.ENOTSUP {
					return st, fmt.Errorf("setxattr %s: %w", p, err)
				}
			}
			dirs = append(dirs, p)
			depth[p] = depth[parent] + 1
			st.Dirs++
		case u < 0.17 && len(files) > 0:
			target := files[len(files)-1-r.intn(min(len(files), 32))]
			rel, err := filepath.Rel(parent, target)
			if err != nil {
				return st, err
			}
			if err := os.Symlink(rel, filepath.Join(parent, fmt.Sprintf("link%d.so", i))); err != nil {
				return st, err
			}
			st.Symlinks++
		case u < 0.175 && len(files) > 0:
			target := files[r.intn(len(files))]
			if err := os.Link(target, filepath.Join(parent, fmt.Sprintf("hard%d", i))); err != nil {
				return st, err
			}
			st.Hardlinks++
		default:
			p := filepath.Join(parent, fmt.Sprintf("f%d%s", i, fileExts[r.intn(len(fileExts))]))
			size := r.smallSize()
			r.fill(buf[:size])
			mode := os.FileMode(0o644)
			if r.intn(10) == 0 {
				mode = 0o755
			}
			if err := os.WriteFile(p, buf[:size], mode); err != nil {
				return st, err
			}
			files = append(files, p)
			st.Files++
			st.Bytes += int64(size)
		}
		st.Entries++
	}
	return st, nil
}

// TestGenerate writes one golden tree for experiments by hand:
// ZGOLDEN_BENCH_GENERATE=DIR:FILES[:COUNTxSIZE] go test -run TestGenerate ./tests/bench
func TestGenerate(t *testing.T) {
	v := os.Getenv("ZGOLDEN_BENCH_GENERATE")
	if v == "" {
		t.Skip("set ZGOLDEN_BENCH_GENERATE=DIR:FILES[:COUNTxSIZE] to generate a golden tree")
	}
	f := strings.Split(v, ":")
	n, err := strconv.Atoi(f[min(1, len(f)-1)])
	if len(f) < 2 || err != nil {
		t.Fatalf("ZGOLDEN_BENCH_GENERATE=%q: want DIR:FILES[:COUNTxSIZE]", v)
	}
	spec := treeSpec{Files: n}
	if len(f) > 2 {
		spec.LargeCount, spec.LargeSize = parseLarge(f[2])
	}
	st, err := generateTree(f[0], spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: %+v", f[0], st)
}
