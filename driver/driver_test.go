package driver

import (
	"context"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
)

func newTestDriver(t *testing.T, f *fakeBackend, stateDir string) *Driver {
	t.Helper()
	if stateDir == "" {
		stateDir = t.TempDir()
	}
	l := logrus.New()
	l.SetLevel(logrus.WarnLevel)
	// The fake backend mounts nothing, so the mount root only needs to be a directory.
	d, err := New(context.Background(), Config{Backend: f, MountRoot: filepath.Join(stateDir, "mnt"), StateDir: stateDir, Log: logrus.NewEntry(l)})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestParseCreate(t *testing.T) {
	ok := []struct {
		name string
		opts map[string]string
		want Spec
	}{
		{"v", nil, Spec{Name: "v", Kind: KindBlock}},
		{"a.b-c_1", map[string]string{"golden": "prj_x"}, Spec{Name: "a.b-c_1", Golden: "prj_x", Kind: KindBlock}},
		{"v", map[string]string{"golden": "p", "generation": "3", "size": "20G", "type": "fs", "cold": "deny"},
			Spec{Name: "v", Golden: "p", Generation: 3, Size: 20 << 30, Kind: KindFS, RequireGolden: true}},
		{strings.Repeat("f", 64), nil, Spec{Name: strings.Repeat("f", 64), Kind: KindBlock}}, // docker's generated names
		{"b", map[string]string{"from": "a"}, Spec{Name: "b", Kind: KindBlock, From: "a"}},
	}
	for _, c := range ok {
		got, err := ParseCreate(c.name, c.opts)
		if err != nil || got != c.want {
			t.Errorf("ParseCreate(%q, %v) = %+v, %v; want %+v", c.name, c.opts, got, err, c.want)
		}
	}
	bad := []struct {
		name, wantMsg string
		opts          map[string]string
	}{
		{"", "empty", nil},
		{"-x", "not allowed", nil},
		{"a/b", "not allowed", nil},
		{"a..b", "not allowed", nil},
		{"a@b", "not allowed", nil},
		{strings.Repeat("x", 97), "limit is 96", nil},
		{"v", `unknown option(s) "dedup", "mountpoint"`, map[string]string{"mountpoint": "/", "dedup": "on"}},
		{"v", "needs golden", map[string]string{"generation": "1"}},
		{"v", "positive integer", map[string]string{"golden": "p", "generation": "0"}},
		{"v", "must be block or fs", map[string]string{"type": "zvol"}},
		{"v", "golden project name", map[string]string{"golden": "a/b"}},
		{"v", "allow or deny", map[string]string{"golden": "p", "cold": "maybe"}},
		{"v", "cannot be combined with golden", map[string]string{"from": "a", "golden": "p"}},
		{"v", "cannot be combined with size, type", map[string]string{"from": "a", "size": "1G", "type": "fs"}},
		{"v", "names the volume being created", map[string]string{"from": "v"}},
		{"v", "option from: invalid request: volume name \"../etc\" is not allowed", map[string]string{"from": "../etc"}},
	}
	for _, c := range bad {
		_, err := ParseCreate(c.name, c.opts)
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), c.wantMsg) {
			t.Errorf("ParseCreate(%q, %v) error = %v; want ErrInvalid mentioning %q", c.name, c.opts, err, c.wantMsg)
		}
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]uint64{
		"1G": 1 << 30, "512M": 512 << 20, "512MiB": 512 << 20, "1.5T": 3 << 39, "20gb": 20 << 30,
		"1073741824": 1 << 30, " 2G ": 2 << 30, "1024P": 1 << 60,
	} {
		if got, err := ParseSize(in); err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "0", "0G", "-1G", "1Q", "G", "1.1B", "100M", "99999999999999999999G", "1025P", "18446744073709551615"} {
		if got, err := ParseSize(in); !errors.Is(err, ErrInvalid) {
			t.Errorf("ParseSize(%q) = %d, %v; want ErrInvalid", in, got, err)
		}
	}
}

// FuzzParseCreate checks that whatever Docker sends, an accepted name is safe as a dataset
// component and a directory name, and an accepted size is in range.
func FuzzParseCreate(f *testing.F) {
	for _, s := range []string{"v", "../x", "a/b", "a@b", "prj_x", "a\x00b", "ü", "1G", "-1G", "1e9G"} {
		f.Add(s, s, s)
	}
	f.Fuzz(func(t *testing.T, name, golden, size string) {
		spec, err := ParseCreate(name, map[string]string{"golden": golden, "size": size})
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %v is not ErrInvalid", err)
			}
			return
		}
		for _, s := range []string{spec.Name, spec.Golden} {
			if s == "" || strings.ContainsAny(s, "/@% \x00\n") || strings.Contains(s, "..") || filepath.Base(s) != s {
				t.Fatalf("accepted unsafe name %q", s)
			}
		}
		if spec.Size < MinSize || spec.Size > MaxSize {
			t.Fatalf("accepted size %d out of range", spec.Size)
		}
	})
}

func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"1G", "1.5T", "0", "-1", "99999999999999999999P", "1.00000000000000000001G"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := ParseSize(s)
		if err == nil && (n < MinSize || n > MaxSize) {
			t.Fatalf("ParseSize(%q) = %d out of range", s, n)
		}
	})
}

func TestMountRefcount(t *testing.T) {
	f := newFake()
	d := newTestDriver(t, f, "")
	ctx := context.Background()
	if err := d.Create(ctx, "v", nil); err != nil {
		t.Fatal(err)
	}
	mp, err := d.Mount(ctx, "v", "a")
	if err != nil || mp != d.mountpoint("v") {
		t.Fatalf("Mount = %q, %v", mp, err)
	}
	for _, id := range []string{"b", "a", "b"} { // repeats count once
		if _, err := d.Mount(ctx, "v", id); err != nil {
			t.Fatal(err)
		}
	}
	must(t, d.Unmount(ctx, "v", "a"))
	must(t, d.Unmount(ctx, "v", "a")) // repeated: no-op
	must(t, d.Unmount(ctx, "v", "zzz"))
	if ok, _ := f.Mounted(mp); !ok {
		t.Fatal("unmounted while b holds the volume")
	}
	if err := d.Remove(ctx, "v"); !errors.Is(err, ErrBusy) {
		t.Fatalf("Remove while mounted: %v", err)
	}
	must(t, d.Unmount(ctx, "v", "b"))
	want := []string{"create v", "mount v", "unmount v"}
	if !slices.Equal(f.actions, want) {
		t.Fatalf("actions = %q, want %q (one mount, one unmount)", f.actions, want)
	}
	must(t, d.Remove(ctx, "v"))
	if len(d.List()) != 0 {
		t.Fatal("volume still listed after Remove")
	}
}

func TestFork(t *testing.T) {
	f := newFake()
	d := newTestDriver(t, f, "")
	ctx := context.Background()
	if err := d.Create(ctx, "b", map[string]string{"from": "a"}); !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), `"a"`) {
		t.Fatalf("fork of a missing volume: %v; want ErrNotFound naming it", err)
	}
	f.goldens["p"] = 3
	must(t, d.Create(ctx, "a", map[string]string{"golden": "p"}))
	must(t, d.Create(ctx, "b", map[string]string{"from": "a"})) // a is not mounted: no freeze
	if _, err := d.Mount(ctx, "a", "c1"); err != nil {
		t.Fatal(err)
	}
	must(t, d.Create(ctx, "c", map[string]string{"from": "a"})) // mounted: frozen
	must(t, d.Create(ctx, "c", map[string]string{"from": "a"})) // Docker's retry: a no-op
	if err := d.Create(ctx, "c", map[string]string{"from": "b"}); !errors.Is(err, ErrExists) {
		t.Fatalf("fork into an existing volume of another source: %v; want ErrExists", err)
	}
	if err := d.Create(ctx, "c", map[string]string{"golden": "p"}); !errors.Is(err, ErrExists) {
		t.Fatalf("a golden Create of an existing fork's name: %v; want ErrExists", err)
	}
	if err := d.Create(ctx, "a", map[string]string{"from": "b"}); !errors.Is(err, ErrExists) {
		t.Fatalf("fork into the existing, unforked a: %v; want ErrExists", err)
	}
	want := []string{"create a", "fork b from a", "mount a", "fork c from a frozen"}
	if !slices.Equal(f.actions, want) {
		t.Fatalf("actions = %q, want %q", f.actions, want)
	}
	in, err := d.Get(ctx, "c")
	if err != nil || in.ForkOf != "a" || in.Golden != "p" || in.Generation != 3 {
		t.Fatalf("Get(c) = %+v, %v; want a fork of a on golden p generation 3", in.Volume, err)
	}
	// Two forks that name each other's volumes at once must not deadlock (locks in name order).
	var wg sync.WaitGroup
	for _, pair := range [][2]string{{"x", "a"}, {"a2", "x"}} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = d.Create(ctx, pair[0], map[string]string{"from": pair[1]})
		}()
	}
	wg.Wait()
}

func TestMountFailureRollsBackReference(t *testing.T) {
	f := newFake()
	state := t.TempDir()
	d := newTestDriver(t, f, state)
	ctx := context.Background()
	must(t, d.Create(ctx, "v", nil))
	f.failOn["mount v"] = errors.New("boom")
	if _, err := d.Mount(ctx, "v", "a"); err == nil || !strings.Contains(err.Error(), "boom") {
		t.Fatalf("Mount error = %v", err)
	}
	if in, _ := d.Get(ctx, "v"); in.Mounts != 0 {
		t.Fatalf("failed mount left %d references", in.Mounts)
	}
	if _, err := os.Stat(filepath.Join(state, "mounts", "v.json")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("failed mount left a saved reference: %v", err)
	}
}

func TestCreateFailureRegistersNothing(t *testing.T) {
	f := newFake()
	d := newTestDriver(t, f, "")
	f.failOn["create v"] = fmt.Errorf("out of space: %w", ErrNoSpace)
	err := d.Create(context.Background(), "v", nil)
	if !errors.Is(err, ErrNoSpace) || !strings.Contains(err.Error(), `create volume "v"`) {
		t.Fatalf("Create error = %v", err)
	}
	if len(d.List()) != 0 {
		t.Fatal("a failed Create is listed")
	}
}

func TestRecoverReconcilesReferencesAndMounts(t *testing.T) {
	f := newFake()
	state := t.TempDir()
	d := newTestDriver(t, f, state)
	ctx := context.Background()
	for _, n := range []string{"held", "stale", "orphan"} {
		must(t, d.Create(ctx, n, nil))
	}
	_, err := d.Mount(ctx, "held", "c1")
	must(t, err)
	_, err = d.Mount(ctx, "stale", "c2")
	must(t, err)
	// What a crash or a reboot can leave: stale's mount gone with its reference still saved,
	// orphan mounted with no reference saved, and references of a volume that no longer exists.
	delete(f.mounts, d.mountpoint("stale"))
	f.mounts[d.mountpoint("orphan")] = "orphan"
	must(t, refStore{dir: filepath.Join(state, "mounts")}.save("gone", map[string]struct{}{"x": {}}))

	d2 := newTestDriver(t, f, state) // restart
	byName := map[string]Info{}
	for _, in := range d2.List() {
		byName[in.Name] = in
	}
	if byName["held"].Mounts != 1 || byName["stale"].Mounts != 0 || byName["orphan"].Mounts != 0 {
		t.Fatalf("recovered mounts: %+v", byName)
	}
	if ok, _ := f.Mounted(d.mountpoint("orphan")); ok {
		t.Fatal("a mount nobody holds was left mounted")
	}
	if _, err := os.Stat(filepath.Join(state, "mounts", "gone.json")); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("references of a removed volume were kept")
	}
	must(t, d2.Unmount(ctx, "held", "c1"))
	if ok, _ := f.Mounted(d.mountpoint("held")); ok {
		t.Fatal("unmount with the pre-restart ID did not unmount")
	}
}

// TestRecoverAfterAHostCrash: mount references are written without fsync (refs.go), so a host
// crash can leave one empty or torn. Of a volume that is not mounted (the crash unmounted it) the
// start drops it; of a volume still mounted it stops the start and says which file and what to do,
// because which containers hold that volume is lost.
func TestRecoverAfterAHostCrash(t *testing.T) {
	f := newFake()
	state := t.TempDir()
	d := newTestDriver(t, f, state)
	ctx := context.Background()
	for _, n := range []string{"crashed", "live"} {
		must(t, d.Create(ctx, n, nil))
	}
	_, err := d.Mount(ctx, "crashed", "c1")
	must(t, err)
	refs := filepath.Join(state, "mounts")
	delete(f.mounts, d.mountpoint("crashed"))
	must(t, os.WriteFile(filepath.Join(refs, "crashed.json"), nil, 0o600)) // empty: the data never reached the disk
	must(t, os.WriteFile(filepath.Join(refs, "gone.json"), []byte(`["x`), 0o600))

	d2 := newTestDriver(t, f, state) // the restart after the reboot
	for _, in := range d2.List() {
		if in.Mounts != 0 {
			t.Errorf("after the crash %s is held by %d containers", in.Name, in.Mounts)
		}
	}
	for _, n := range []string{"crashed", "gone"} {
		if _, err := os.Stat(filepath.Join(refs, n+".json")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the unreadable references of %s were kept (%v)", n, err)
		}
	}

	_, err = d2.Mount(ctx, "live", "c2")
	must(t, err)
	must(t, os.WriteFile(filepath.Join(refs, "live.json"), []byte("{"), 0o600))
	l := logrus.New()
	l.SetLevel(logrus.WarnLevel)
	_, err = New(ctx, Config{Backend: f, MountRoot: filepath.Join(state, "mnt"), StateDir: state, Log: logrus.NewEntry(l)})
	if err == nil || !strings.Contains(err.Error(), filepath.Join(refs, "live.json")) || !strings.Contains(err.Error(), "is mounted at") {
		t.Fatalf("a start with unreadable references of a mounted volume: %v; want it refused, naming the file", err)
	}
	if ok, _ := f.Mounted(d.mountpoint("live")); !ok {
		t.Error("the refused start unmounted the volume")
	}
}

// TestConcurrentOperations runs random operations on a few names from many goroutines (run it
// with -race) and then checks the invariant: a volume is mounted exactly when callers hold it.
func TestConcurrentOperations(t *testing.T) {
	f := newFake()
	d := newTestDriver(t, f, "")
	ctx := context.Background()
	names := []string{"a", "b", "c"}
	var wg sync.WaitGroup
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func(seed int64) {
			defer wg.Done()
			r := rand.New(rand.NewSource(seed))
			for i := 0; i < 300; i++ {
				n := names[r.Intn(len(names))]
				id := fmt.Sprintf("id%d", r.Intn(4))
				switch r.Intn(6) {
				case 0:
					_ = d.Create(ctx, n, nil)
				case 1:
					_ = d.Remove(ctx, n)
				case 2:
					_, _ = d.Mount(ctx, n, id)
				case 3:
					_ = d.Unmount(ctx, n, id)
				case 4:
					_, _ = d.Get(ctx, n)
				case 5:
					_ = d.List()
				}
			}
		}(int64(g))
	}
	wg.Wait()
	for _, in := range d.List() {
		mounted, _ := f.Mounted(d.mountpoint(in.Name))
		if mounted != (in.Mounts > 0) {
			t.Errorf("%s: mounted=%v but %d callers hold it", in.Name, mounted, in.Mounts)
		}
		if _, ok := f.vols[in.Name]; !ok {
			t.Errorf("%s is listed but the backend does not have it", in.Name)
		}
	}
	if len(f.vols) != len(d.List()) {
		t.Errorf("backend has %d volumes, driver lists %d", len(f.vols), len(d.List()))
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// TestCreatesWaitForTheirProjectsImportOnly: while a project's golden is being imported, Creates
// for it wait and then get a clone; Creates for other projects are not blocked; a Create whose
// wait runs out gets a retryable error naming the progress.
func TestCreatesWaitForTheirProjectsImportOnly(t *testing.T) {
	f := newFake()
	f.importGate = make(chan struct{})
	d := newTestDriver(t, f, "")
	d.cfg.ImportWait = time.Minute
	ctx := context.Background()
	src := t.TempDir()
	importDone := make(chan error, 1)
	go func() {
		_, err := d.Import(ctx, "p1", KindBlock, src, ImportOptions{}, nil)
		importDone <- err
	}()
	for { // until the import is registered
		if _, running := d.ImportProgress("p1"); running {
			break
		}
		time.Sleep(time.Millisecond)
	}
	must(t, d.Create(ctx, "other", map[string]string{"golden": "p2"})) // not blocked
	created := make(chan error, 1)
	go func() { created <- d.Create(ctx, "waiter", map[string]string{"golden": "p1"}) }()
	select {
	case err := <-created:
		t.Fatalf("a Create for the importing project returned before the import finished: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	close(f.importGate)
	must(t, <-importDone)
	must(t, <-created)
	in, err := d.Get(ctx, "waiter")
	must(t, err)
	if in.ColdStart || in.Generation != 1 {
		t.Fatalf("the waiting Create got %+v, want a clone of generation 1", in.Volume)
	}

	// An import that outlasts ImportWait: a clear, retryable error, and nothing created.
	f.importGate = make(chan struct{})
	defer close(f.importGate)
	d.cfg.ImportWait = 20 * time.Millisecond
	go func() { _, _ = d.Import(ctx, "p3", KindBlock, src, ImportOptions{}, nil) }()
	for {
		if _, running := d.ImportProgress("p3"); running {
			break
		}
		time.Sleep(time.Millisecond)
	}
	err = d.Create(ctx, "impatient", map[string]string{"golden": "p3"})
	if !errors.Is(err, ErrImportRunning) || !strings.Contains(err.Error(), "retry") {
		t.Fatalf("Create during a long import: %v; want ErrImportRunning with advice", err)
	}
	if _, ok := f.vols["impatient"]; ok {
		t.Fatal("the timed-out Create made a volume")
	}
}

// TestLegacyGoldenAutoImport: with --legacy-goldens, the first Create for a project that has a
// legacy directory but no golden imports it and gets a clone; a project without one cold-starts.
func TestLegacyGoldenAutoImport(t *testing.T) {
	f := newFake()
	d := newTestDriver(t, f, "")
	legacy := t.TempDir()
	must(t, os.Mkdir(filepath.Join(legacy, "prj_a"), 0o755))
	d.cfg.LegacyGoldens = filepath.Join(legacy, "{project}")
	ctx := context.Background()
	must(t, d.Create(ctx, "first", map[string]string{"golden": "prj_a"}))
	in, _ := d.Get(ctx, "first")
	if in.ColdStart || in.Generation != 1 || !slices.Equal(f.imported, []string{filepath.Join(legacy, "prj_a")}) {
		t.Fatalf("first Create = %+v, imported %v; want a clone of the imported legacy golden", in.Volume, f.imported)
	}
	must(t, d.Create(ctx, "second", map[string]string{"golden": "prj_a"}))
	if len(f.imported) != 1 {
		t.Fatalf("imported again: %v", f.imported)
	}
	must(t, d.Create(ctx, "nolegacy", map[string]string{"golden": "prj_b"}))
	if in, _ := d.Get(ctx, "nolegacy"); !in.ColdStart {
		t.Fatalf("a project without a legacy directory: %+v, want a cold start", in.Volume)
	}
	err := d.Create(ctx, "deny", map[string]string{"golden": "prj_c", "cold": "deny"})
	if !errors.Is(err, ErrNoGolden) {
		t.Fatalf("cold=deny without golden or legacy directory: %v", err)
	}
}

// TestImportRefusesOwnDirectories: an import (which may delete its source) can never name
// zgolden's own mount root or state directory, or /.
func TestImportRefusesOwnDirectories(t *testing.T) {
	f := newFake()
	d := newTestDriver(t, f, "")
	for _, src := range []string{"/", "relative/dir", d.cfg.MountRoot, d.cfg.StateDir, filepath.Dir(d.cfg.StateDir), filepath.Join(d.cfg.MountRoot, "v")} {
		_, err := d.Import(context.Background(), "p", KindBlock, src, ImportOptions{RemoveSource: true}, nil)
		if !errors.Is(err, ErrInvalid) {
			t.Errorf("Import(%q) = %v, want ErrInvalid", src, err)
		}
	}
	if len(f.imported) != 0 {
		t.Fatalf("imported %v", f.imported)
	}
}

func TestParseReserve(t *testing.T) {
	for in, want := range map[string]Reserve{"0": {}, "": {}, "10%": {Percent: 10}, "0.5%": {Percent: 0.5}, "50G": {Bytes: 50 << 30}, "512M": {Bytes: 512 << 20}} {
		if got, err := ParseReserve(in); err != nil || got != want {
			t.Errorf("ParseReserve(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, bad := range []string{"100%", "-1%", "x%", "lots", "-5G"} {
		if _, err := ParseReserve(bad); err == nil {
			t.Errorf("ParseReserve(%q) accepted it", bad)
		}
	}
	if got := (Reserve{Percent: 10}).of(1000); got != 100 {
		t.Errorf("10%% of 1000 = %d", got)
	}
	for n, want := range map[uint64]string{0: "0 B", 1023: "1023 B", 1536: "1.5 KiB", 3 << 30: "3.0 GiB"} {
		if got := FormatSize(n); got != want {
			t.Errorf("FormatSize(%d) = %q, want %q", n, got, want)
		}
	}
}

// TestReserveRefusesNewWork: below the reserve a Create of a new volume fails with ErrNoSpace,
// naming the free space and the reserve, while a repeated Create of an existing volume (Docker's
// retry) still succeeds; the space is read again once the cached read is older than spaceTTL.
func TestReserveRefusesNewWork(t *testing.T) {
	f := newFake()
	f.space = Space{Available: 50 << 30, Total: 100 << 30}
	d := newTestDriver(t, f, "")
	d.cfg.Reserve = Reserve{Percent: 10}
	ctx := context.Background()
	if err := d.Create(ctx, "a", nil); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	f.space.Available = 5 << 30
	f.mu.Unlock()
	d.spaceMu.Lock()
	d.spaceAt = time.Time{} // as if spaceTTL had passed
	d.spaceMu.Unlock()
	err := d.Create(ctx, "b", nil)
	if !errors.Is(err, ErrNoSpace) || !strings.Contains(err.Error(), "5.0 GiB free of 100.0 GiB is below the reserve of 10.0 GiB (--reserve 10%)") {
		t.Fatalf("Create below the reserve: %v", err)
	}
	if err := d.Create(ctx, "a", nil); err != nil {
		t.Errorf("a repeated Create of an existing volume below the reserve: %v", err)
	}
}

// TestImportAbortsAFailedCopy: the driver's one import pipeline commits a generation only after a
// verified copy, and aborts the backend's writer when the copy fails, so nothing half-copied
// becomes a generation.
func TestImportAbortsAFailedCopy(t *testing.T) {
	f := newFake()
	d := newTestDriver(t, f, "")
	ctx := context.Background()
	src := t.TempDir()
	must(t, os.WriteFile(filepath.Join(src, "f"), []byte("data"), 0o644))
	var phases []string
	gen, err := d.Import(ctx, "ok", KindBlock, src, ImportOptions{}, func(p Progress) {
		if len(phases) == 0 || phases[len(phases)-1] != p.Phase {
			phases = append(phases, p.Phase)
		}
	})
	must(t, err)
	if gen.Number != 1 || len(f.writers) != 1 || !f.writers[0].committed || f.writers[0].aborted {
		t.Fatalf("import = %+v, writers %+v; want generation 1, committed", gen, f.writers)
	}
	if got, err := os.ReadFile(filepath.Join(f.writers[0].dir, "f")); err != nil || string(got) != "data" {
		t.Fatalf("the copy in the writer's directory: %q, %v", got, err)
	}
	if want := []string{"waiting for the project lock", "scanning", "formatting", "copying", "syncing", "done"}; !slices.Equal(phases[len(phases)-len(want)+1:], want[1:]) {
		t.Fatalf("phases %v, want %v", phases, want)
	}

	f.writerDir = filepath.Join(t.TempDir(), "a-file") // cp cannot copy a directory onto a file
	must(t, os.WriteFile(f.writerDir, nil, 0o644))
	if _, err := d.Import(ctx, "bad", KindBlock, src, ImportOptions{RemoveSource: true}, nil); err == nil {
		t.Fatal("an import whose copy failed succeeded")
	}
	if w := f.writers[1]; w.committed || !w.aborted {
		t.Fatalf("after a failed copy the writer is committed=%v aborted=%v; want aborted only", w.committed, w.aborted)
	}
	if _, err := os.Stat(filepath.Join(src, "f")); err != nil {
		t.Fatalf("a failed import removed its source: %v", err)
	}
}

// TestPickGeneration: the one rule every store applies to pick what a Create clones.
func TestPickGeneration(t *testing.T) {
	gens := []Generation{{Project: "p", Number: 1}, {Project: "p", Number: 3}}
	for _, c := range []struct {
		name string
		spec Spec
		kind Kind
		gens []Generation
		want int   // generation number, 0 for a cold start
		err  error // nil, or what the refusal wraps
		text string
	}{
		{"newest", Spec{Golden: "p", Kind: KindBlock}, KindBlock, gens, 3, nil, ""},
		{"asked for", Spec{Golden: "p", Kind: KindBlock, Generation: 1}, KindBlock, gens, 1, nil, ""},
		{"missing", Spec{Golden: "p", Kind: KindBlock, Generation: 2}, KindBlock, gens, 0, ErrNotFound, "it has 1, 3"},
		{"none yet, asked for one", Spec{Golden: "p", Kind: KindBlock, Generation: 2}, "", nil, 0, ErrNotFound, "generation=2 does not exist"},
		{"cold start", Spec{Golden: "p", Kind: KindBlock}, "", nil, 0, nil, ""},
		{"cold=deny", Spec{Golden: "p", Kind: KindBlock, RequireGolden: true}, "", nil, 0, ErrNoGolden, "cold=deny"},
		{"cold=deny with a golden", Spec{Golden: "p", Kind: KindBlock, RequireGolden: true}, KindBlock, gens, 3, nil, ""},
		{"other type", Spec{Golden: "p", Kind: KindFS}, KindBlock, gens, 0, ErrInvalid, "type=block"},
	} {
		g, err := PickGeneration(c.spec, c.kind, c.gens)
		switch {
		case c.err != nil:
			if !errors.Is(err, c.err) || !strings.Contains(err.Error(), c.text) || g != nil {
				t.Errorf("%s: %v, %v; want nil and an error wrapping %v that says %q", c.name, g, err, c.err, c.text)
			}
		case err != nil:
			t.Errorf("%s: %v", c.name, err)
		case c.want == 0 && g != nil, c.want != 0 && (g == nil || g.Number != c.want):
			t.Errorf("%s: picked %+v, want generation %d (0: a cold start)", c.name, g, c.want)
		}
	}
}

// restartedWithMount mounts volume v for caller c1 and starts a second driver on the same state,
// as after a crash inside v's Unmount, with active as Config.Active.
func restartedWithMount(t *testing.T, active func(context.Context, string) (bool, error)) (f *fakeBackend, d, d2 *Driver) {
	t.Helper()
	ctx := context.Background()
	f = newFake()
	state := t.TempDir()
	d = newTestDriver(t, f, state)
	must(t, d.Create(ctx, "v", nil))
	_, err := d.Mount(ctx, "v", "c1")
	must(t, err)
	l := logrus.New()
	l.SetLevel(logrus.WarnLevel)
	d2, err = New(ctx, Config{Backend: f, MountRoot: filepath.Join(state, "mnt"), StateDir: state, Log: logrus.NewEntry(l), Active: active})
	must(t, err)
	return f, d, d2
}

// TestLoadDropsReferencesOfACrashedUnmount: a crash inside Unmount leaves the volume mounted
// with its reference saved, and Docker never sends that Unmount again. The next start asks
// Docker (Config.Active): references of a volume no live container uses are dropped and the
// volume unmounted; with a live one, or without an answer, they stand.
func TestLoadDropsReferencesOfACrashedUnmount(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name   string
		active func(context.Context, string) (bool, error)
		want   int
	}{
		{"no live container", func(context.Context, string) (bool, error) { return false, nil }, 0},
		{"a live container", func(context.Context, string) (bool, error) { return true, nil }, 1},
		{"docker unreachable", func(context.Context, string) (bool, error) { return false, errors.New("no engine") }, 1},
		{"not configured", nil, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, d, d2 := restartedWithMount(t, tc.active)
			// The first recheck runs right after the start, in the background.
			var in Info
			for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
				if in, _ = d2.Get(ctx, "v"); in.Mounts == tc.want || time.Now().After(deadline) {
					break
				}
			}
			if in.Mounts != tc.want {
				t.Fatalf("after the restart v is held by %d mount(s), want %d", in.Mounts, tc.want)
			}
			if ok, _ := f.Mounted(d.mountpoint("v")); ok != (tc.want == 1) {
				t.Fatalf("mounted = %v with %d reference(s) left", ok, tc.want)
			}
			// A reference taken since the start is never suspect.
			_, err := d2.Mount(ctx, "v", "c2")
			must(t, err)
			if err := d2.Remove(ctx, "v"); !errors.Is(err, ErrBusy) {
				t.Fatalf("Remove of a volume a container mounted since the start: %v, want busy", err)
			}
			must(t, d2.Unmount(ctx, "v", "c2"))
		})
	}
}

// TestRemoveDropsReferencesOfACrashedUnmount: while Docker still said the container might use
// the volume at the start (it was in its exit, waiting on the Unmount that failed), the
// references stand; Docker's Remove, which it sends only when no container references the
// volume, asks again and removes it.
func TestRemoveDropsReferencesOfACrashedUnmount(t *testing.T) {
	ctx := context.Background()
	var mu sync.Mutex
	active := true
	f, d, d2 := restartedWithMount(t, func(context.Context, string) (bool, error) { mu.Lock(); defer mu.Unlock(); return active, nil })
	if in, _ := d2.Get(ctx, "v"); in.Mounts != 1 {
		t.Fatalf("while Docker says the container may still use it, v is held by %d mount(s), want 1", in.Mounts)
	}
	mu.Lock()
	active = false
	mu.Unlock()
	if err := d2.Remove(ctx, "v"); err != nil {
		t.Fatalf("Remove once Docker says no container uses it: %v", err)
	}
	if ok, _ := f.Mounted(d.mountpoint("v")); ok {
		t.Fatal("the removed volume is still mounted")
	}
}
