package driver

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Errors a Backend returns for the driver (and the user) to act on.
var (
	ErrNotFound        = errors.New("not found")
	ErrExists          = errors.New("already exists")
	ErrBusy            = errors.New("busy")
	ErrNoSpace         = errors.New("out of space")
	ErrNoGolden        = errors.New("no golden")
	ErrHasDependents   = errors.New("has dependent volumes")
	ErrImportRunning   = errors.New("golden import in progress")
	ErrGenerationInUse = errors.New("generation is in use")
)

// errorKinds names the errors above for ErrorKind, most specific first.
var errorKinds = []struct {
	err  error
	name string
}{
	{ErrInvalid, "invalid"}, {ErrNotFound, "not_found"}, {ErrExists, "exists"}, {ErrBusy, "busy"},
	{ErrNoSpace, "no_space"}, {ErrNoGolden, "no_golden"}, {ErrHasDependents, "has_dependents"},
	{ErrImportRunning, "import_running"}, {ErrGenerationInUse, "generation_in_use"},
	{context.DeadlineExceeded, "deadline"}, {context.Canceled, "canceled"},
}

// ErrorKind names the kind of err for metrics: one of the errors above in snake case,
// "deadline" or "canceled", "other" for anything else, and "" for nil.
func ErrorKind(err error) string {
	if err == nil {
		return ""
	}
	for _, k := range errorKinds {
		if errors.Is(err, k.err) {
			return k.name
		}
	}
	return "other"
}

// Volume is what a backend records about one volume, in its own durable metadata (ZFS user
// properties, or the image file's extended attributes).
type Volume struct {
	Name       string
	Kind       Kind
	Golden     string // project it was cloned from, or asked for ("" for a plain volume)
	Generation int    // generation cloned; 0 for a plain volume or a cold start
	ColdStart  bool   // a golden was asked for but the project had none yet
	CreatedAt  time.Time
	Size       uint64 // bytes
	Source     string // dataset name or image path, for status and logs
	// ForkOf is the volume this one was forked from (-o from=), which may be gone since: a fork
	// never depends on its source. Golden and Generation are then the source's.
	ForkOf string
}

// Usage is a volume's live space accounting.
type Usage struct {
	Size       uint64 // provisioned bytes (volsize, image size, or quota)
	Logical    uint64 // bytes the volume's filesystem addresses (logicalreferenced)
	Written    uint64 // bytes unique to this volume since its clone
	Device     string // block device, when there is one
	Referenced uint64 // bytes the volume references, shared or not
}

// Generation is one numbered snapshot of a project's golden.
type Generation struct {
	Project    string
	Number     int
	Kind       Kind
	CreatedAt  time.Time
	Dependents []string // volumes cloned from it that still exist
	Used       uint64   // bytes held only by this generation
	Referenced uint64   // bytes the generation references
	Source     string   // snapshot name or image path
	FromVolume string   // volume it was promoted from, if any
	// GUID identifies the generation's content across hosts (the snapshot's guid on ZFS; on the
	// reflink store one given at its first export, "" before): transfers match generations by it.
	GUID string
}

// Golden is one project's golden with its generations, oldest first.
type Golden struct {
	Project     string
	Kind        Kind
	Generations []Generation
	// Importing is set while an import is running or was interrupted; such a golden is never cloned.
	Importing bool
	// Partial is the interrupted receive kept for a resume (nil: none); it is not a generation.
	Partial *PartialReceive `json:",omitempty"`
}

// Newest returns the newest generation, or nil.
func (g Golden) Newest() *Generation {
	if len(g.Generations) == 0 {
		return nil
	}
	return &g.Generations[len(g.Generations)-1]
}

// Progress reports an import's progress.
type Progress struct {
	FilesDone, FilesTotal int64
	BytesDone, BytesTotal int64
	Phase                 string
}

// Backend stores volumes and goldens. Implementations are safe for concurrent use on different
// names; the driver serialises calls on one volume name and one project (see Driver's lock rules).
// Every method that creates things rolls back what it made before returning an error.
type Backend interface {
	// Name is "zfs" or "reflink", for logs and status.
	Name() string
	// Load finishes or rolls back whatever a crash interrupted (half-made volumes, interrupted
	// imports and promotions) and returns every complete volume.
	Load(ctx context.Context) ([]Volume, error)
	// Create makes a volume, cloning the requested golden generation if there is one.
	Create(ctx context.Context, spec Spec) (Volume, error)
	// Fork makes spec.Name (spec.From is src.Name) from src's current content, in time
	// independent of the data it holds. A mounted src is frozen at mountpoint ("" when it is not
	// mounted) for the instant of its snapshot, so the fork is crash-consistent. The fork never
	// pins src: removing src leaves the fork whole, and the other way round.
	Fork(ctx context.Context, src Volume, mountpoint string, spec Spec) (Volume, error)
	// Remove destroys an unmounted volume in time independent of the data it holds.
	Remove(ctx context.Context, v Volume) error
	// Mount makes the volume's filesystem available at target.
	Mount(ctx context.Context, v Volume, target string) error
	// Unmount undoes Mount (and detaches any loop device).
	Unmount(ctx context.Context, v Volume, target string) error
	// Mounted reports whether something is mounted at target, from the kernel's mount table.
	Mounted(target string) (bool, error)
	// Usage reports a volume's space.
	Usage(ctx context.Context, v Volume) (Usage, error)

	// Goldens lists every project's golden.
	Goldens(ctx context.Context) ([]Golden, error)
	// Promote snapshots v (frozen at mountpoint if it is mounted, else "") as project's next generation.
	Promote(ctx context.Context, v Volume, mountpoint, project string) (Generation, error)
	// BeginGeneration makes project's next generation, empty, with room for a tree of size bytes,
	// and mounts it for the driver to fill (Import owns the copy and its checks). A project
	// without a golden is created with kind; one of another kind is refused (KindMismatchError).
	// from says where the content comes from, for `golden ls`. Until Commit, a crash leaves
	// nothing that a Create could clone: Load removes it.
	BeginGeneration(ctx context.Context, project string, kind Kind, size uint64, from string) (GenerationWriter, error)
	// OwnDirs names the host directories the backend keeps data in (besides the driver's mount
	// root and state directory), which an import source must not overlap, each with what it
	// is for the refusal ("the reflink store's root").
	OwnDirs() map[string]string
	// RemoveGeneration destroys one generation that no volume depends on.
	RemoveGeneration(ctx context.Context, project string, number int) error
	// RemoveGolden destroys a project's golden; it fails with ErrHasDependents while volumes depend on it.
	RemoveGolden(ctx context.Context, project string) error
	// Status reports backend-wide facts (pool or store, free space) for `zgolden status`.
	// Its Status has AvailableBytes, UsedBytes, RemovedPending and the backend's own part set.
	Status(ctx context.Context) (Status, error)
	// Space reports the free space new data can use and the capacity it is part of, which is
	// what the driver holds Config.Reserve against.
	Space(ctx context.Context) (Space, error)
}

// GenerationWriter is a generation being written, from Backend.BeginGeneration: an empty
// filesystem mounted at Dir. The driver fills Dir and then calls exactly one of Commit and Abort.
type GenerationWriter interface {
	// Number is the generation's number.
	Number() int
	// Dir is where its filesystem is mounted.
	Dir() string
	// Commit unmounts it, marks it complete (from then on a crash rolls forward) and makes it
	// visible to Creates. phase names each step it takes that may last (such as "compacting").
	Commit(ctx context.Context, phase func(string)) (Generation, error)
	// Abort unmounts and destroys it; what cannot be unmounted now is left for Load.
	Abort(ctx context.Context)
}

// Space is a backend's free space: Available bytes can still be written (by new volumes and by
// the ones running), of Total bytes in all.
type Space struct{ Available, Total uint64 }

// PickGeneration is the driver's rule for what a Create of spec clones, applied by a store to
// what it holds of spec.Golden under its own lock: the project's type kind ("" when it has no
// golden) and its generations, oldest first. It returns generation spec.Generation, or the
// newest when that is 0; nil, nil for a cold start; and otherwise the refusal: a generation that
// is not there (naming those that are), a type that does not match, or cold=deny without a
// golden.
func PickGeneration(spec Spec, kind Kind, gens []Generation) (*Generation, error) {
	g, err := pickGeneration(spec.Golden, kind, spec.Kind, gens, spec.Generation)
	if g == nil && err == nil && spec.RequireGolden {
		return nil, ColdDeniedError(spec.Golden)
	}
	return g, err
}

func pickGeneration(project string, kind, want Kind, gens []Generation, n int) (*Generation, error) {
	if kind == "" {
		kind = want
	}
	if len(gens) == 0 {
		if n > 0 {
			return nil, fmt.Errorf("%w: golden %q has no generations, so generation=%d does not exist", ErrNotFound, project, n)
		}
		return nil, nil
	}
	if kind != want {
		return nil, fmt.Errorf("%w: golden %q holds type=%s volumes; pass -o type=%s", ErrInvalid, project, kind, kind)
	}
	if n == 0 {
		g := gens[len(gens)-1]
		return &g, nil
	}
	have := make([]string, len(gens))
	for i, g := range gens {
		if g.Number == n {
			return &g, nil
		}
		have[i] = strconv.Itoa(g.Number)
	}
	return nil, fmt.Errorf("%w: golden %q has no generation %d (it has %s)", ErrNotFound, project, n, strings.Join(have, ", "))
}
