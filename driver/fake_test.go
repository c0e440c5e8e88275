package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"
)

// fakeBackend is an in-memory Backend that records what it was asked to do, with a fake mount
// table, so driver logic can be tested without root. Real storage is covered by drivertest.
type fakeBackend struct {
	mu      sync.Mutex
	vols    map[string]Volume
	mounts  map[string]string // target -> volume
	actions []string
	failOn  map[string]error // action name -> error to return once
	goldens map[string]int   // project -> newest generation
	// importGate, when set, holds every BeginGeneration until it is closed.
	importGate chan struct{}
	// writerDir, when set, is the Dir of every generation writer (a regular file there makes
	// the copy fail).
	writerDir string
	writers   []*fakeWriter
	imported  []string // sources imported
	space     Space    // what Space reports
}

func newFake() *fakeBackend {
	return &fakeBackend{vols: map[string]Volume{}, mounts: map[string]string{}, failOn: map[string]error{}, goldens: map[string]int{}}
}

func (f *fakeBackend) record(action string) error {
	f.actions = append(f.actions, action)
	for k, err := range f.failOn {
		if k == action {
			delete(f.failOn, k)
			return err
		}
	}
	return nil
}

func (f *fakeBackend) Name() string { return "fake" }

func (f *fakeBackend) Load(context.Context) ([]Volume, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []Volume
	for _, v := range f.vols {
		out = append(out, v)
	}
	return out, nil
}

func (f *fakeBackend) Create(_ context.Context, spec Spec) (Volume, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.record("create " + spec.Name); err != nil {
		return Volume{}, err
	}
	if _, ok := f.vols[spec.Name]; ok {
		return Volume{}, fmt.Errorf("fake: %s exists", spec.Name)
	}
	v := Volume{Name: spec.Name, Kind: spec.Kind, Golden: spec.Golden, Size: spec.Size, CreatedAt: time.Now(), Source: "fake/" + spec.Name}
	if spec.Golden != "" {
		gen, ok := f.goldens[spec.Golden]
		switch {
		case ok:
			v.Generation = gen
		case spec.RequireGolden:
			return Volume{}, fmt.Errorf("fake: %w", ErrNoGolden)
		default:
			v.ColdStart = true
		}
	}
	f.vols[spec.Name] = v
	return v, nil
}

func (f *fakeBackend) Fork(_ context.Context, src Volume, mountpoint string, spec Spec) (Volume, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	frozen := ""
	if mountpoint != "" {
		frozen = " frozen"
	}
	if err := f.record("fork " + spec.Name + " from " + src.Name + frozen); err != nil {
		return Volume{}, err
	}
	v := src
	v.Name, v.ForkOf, v.Source, v.CreatedAt = spec.Name, src.Name, "fake/"+spec.Name, time.Now()
	f.vols[spec.Name] = v
	return v, nil
}

func (f *fakeBackend) Remove(_ context.Context, v Volume) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.record("remove " + v.Name); err != nil {
		return err
	}
	for _, name := range f.mounts {
		if name == v.Name {
			return fmt.Errorf("fake: %s is mounted: %w", v.Name, ErrBusy)
		}
	}
	delete(f.vols, v.Name)
	return nil
}

func (f *fakeBackend) Mount(_ context.Context, v Volume, target string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.record("mount " + v.Name); err != nil {
		return err
	}
	if _, ok := f.mounts[target]; ok {
		return fmt.Errorf("fake: %s already mounted", target)
	}
	f.mounts[target] = v.Name
	return nil
}

func (f *fakeBackend) Unmount(_ context.Context, v Volume, target string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.record("unmount " + v.Name); err != nil {
		return err
	}
	if _, ok := f.mounts[target]; !ok {
		return fmt.Errorf("fake: %s not mounted", target)
	}
	delete(f.mounts, target)
	return nil
}

func (f *fakeBackend) Mounted(target string) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	_, ok := f.mounts[target]
	return ok, nil
}

func (f *fakeBackend) Usage(context.Context, Volume) (Usage, error) { return Usage{Size: 1}, nil }
func (f *fakeBackend) Goldens(context.Context) ([]Golden, error)    { return nil, nil }
func (f *fakeBackend) Promote(context.Context, Volume, string, string) (Generation, error) {
	return Generation{}, errFakeUnsupported
}
func (f *fakeBackend) BeginGeneration(ctx context.Context, project string, _ Kind, _ uint64, from string) (GenerationWriter, error) {
	if f.importGate != nil {
		select {
		case <-f.importGate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	dir, err := os.MkdirTemp("", "fake-gen-")
	if err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	w := &fakeWriter{f: f, project: project, src: strings.TrimPrefix(from, "import:"), dir: dir, n: f.goldens[project] + 1}
	if f.writerDir != "" {
		w.dir = f.writerDir
	}
	f.writers = append(f.writers, w)
	return w, nil
}

func (f *fakeBackend) OwnDirs() map[string]string { return nil }

// fakeWriter is the fake's GenerationWriter: a temporary directory; Commit counts the generation.
type fakeWriter struct {
	f                  *fakeBackend
	project, src, dir  string
	n                  int
	committed, aborted bool
}

func (w *fakeWriter) Number() int { return w.n }
func (w *fakeWriter) Dir() string { return w.dir }
func (w *fakeWriter) Abort(context.Context) {
	w.f.mu.Lock()
	defer w.f.mu.Unlock()
	w.aborted = true
}
func (w *fakeWriter) Commit(context.Context, func(string)) (Generation, error) {
	w.f.mu.Lock()
	defer w.f.mu.Unlock()
	w.committed = true
	w.f.goldens[w.project]++
	w.f.imported = append(w.f.imported, w.src)
	return Generation{Project: w.project, Number: w.f.goldens[w.project]}, nil
}
func (f *fakeBackend) RemoveGeneration(context.Context, string, int) error { return errFakeUnsupported }
func (f *fakeBackend) RemoveGolden(context.Context, string) error          { return errFakeUnsupported }
func (f *fakeBackend) Status(context.Context) (Status, error)              { return Status{}, nil }
func (f *fakeBackend) Space(context.Context) (Space, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.space, nil
}

// errFakeUnsupported is what the fake answers for the generation calls no driver test needs.
var errFakeUnsupported = errors.New("not supported by the fake backend")
