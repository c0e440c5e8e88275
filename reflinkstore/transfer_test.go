package reflinkstore_test

import (
	"bytes"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/driver/drivertest"
	"github.com/zgolden/zgolden/reflinkstore"
	"golang.org/x/sys/unix"
)

// TestTransferBetweenStores: a generation moves between two reflink stores whole, as a sparse
// stream; every bad stream is refused with nothing of it kept; a diverged receiver is refused.
func TestTransferBetweenStores(t *testing.T) {
	base := newBase(t)
	a := newEnv(t, filepath.Join(base, "a"), filepath.Join(base, "a", "root"), nil)
	b := newEnv(t, filepath.Join(base, "b"), filepath.Join(base, "b", "root"), nil)
	ctx := testCtx(t)
	g1 := a.importTree(t, "prj")

	var stream bytes.Buffer
	h, err := a.d.Export(ctx, "prj", 0, 0, &stream)
	if err != nil || h.Generation != g1.Number || h.Backend != "reflink" {
		t.Fatalf("export: %+v, %v", h, err)
	}
	t.Logf("stream of generation %d: %d bytes (its image is %d bytes, sparse)", h.Generation, stream.Len(), g1.Referenced)
	if _, err := a.d.Export(ctx, "prj", 0, 1, &bytes.Buffer{}); !errors.Is(err, driver.ErrInvalid) || !strings.Contains(err.Error(), "whole generations") {
		t.Errorf("an incremental export from a reflink store: %v; want a refusal", err)
	}

	refuse := func(what, project string, body []byte, want error, says string) {
		t.Helper()
		before := b.storeEntries(t, "goldens")
		_, err := b.d.Receive(ctx, project, bytes.NewReader(body))
		if !errors.Is(err, want) || !strings.Contains(err.Error(), says) {
			t.Errorf("%s: %v; want an error wrapping %v that says %q", what, err, want, says)
		} else {
			t.Logf("%s: %v", what, err)
		}
		if after := b.storeEntries(t, "goldens"); !slices.Equal(after, before) {
			t.Errorf("%s left %v (before: %v)", what, after, before)
		}
		assertNoImageLoops(t, b)
	}
	full := stream.Bytes()
	refuse("a truncated stream", "prj", full[:len(full)*2/3], driver.ErrInvalid, "truncated")
	corrupt := slices.Clone(full)
	corrupt[len(corrupt)-100] ^= 0xff // in the last record's data: only the digest can tell
	refuse("a corrupt stream", "prj", corrupt, driver.ErrInvalid, "digest")
	refuse("a stream for another project", "other", full, driver.ErrInvalid, `carries golden "prj"`)
	zfsHeader := strings.Replace(string(full[:bytes.IndexByte(full, '\n')+1]), `"backend":"reflink"`, `"backend":"zfs"`, 1)
	refuse("a ZFS stream", "prj", append([]byte(zfsHeader), full[bytes.IndexByte(full, '\n')+1:]...), driver.ErrInvalid, "from a zfs store")

	got, err := b.d.Receive(ctx, "prj", bytes.NewReader(full))
	if err != nil || got.Number != g1.Number {
		t.Fatalf("receive: %+v, %v", got, err)
	}
	b.create(t, "bv", map[string]string{"golden": "prj"})
	drivertest.CheckTree(t, b.mount(t, "bv", "x"))
	b.unmount(t, "bv", "x")
	if again, err := b.d.Receive(ctx, "prj", bytes.NewReader(full)); err != nil || again.Number != g1.Number {
		t.Errorf("the same stream again: %+v, %v", again, err)
	}

	// The receiver promotes a generation of its own; the sender's next one then diverges.
	b.create(t, "bown", map[string]string{"golden": "prj"})
	if _, err := b.d.Promote(ctx, "bown", "prj"); err != nil {
		t.Fatal(err)
	}
	a.create(t, "aown", map[string]string{"golden": "prj"})
	if _, err := a.d.Promote(ctx, "aown", "prj"); err != nil {
		t.Fatal(err)
	}
	var next bytes.Buffer
	if _, err := a.d.Export(ctx, "prj", 0, 0, &next); err != nil {
		t.Fatal(err)
	}
	refuse("a diverged receiver", "prj", next.Bytes(), driver.ErrGenerationInUse, "diverged")

	for _, e := range []*env{a, b} {
		for _, v := range e.d.List() {
			e.remove(t, v.Name)
		}
		e.finish(t)
	}
}

// TestReceiveOutOfSpace sends a golden whose image holds more data than the receiver's store has
// room for: the receive fails with ErrNoSpace, says what to do, keeps nothing, and the store takes
// an ordinary volume after it. The receiver's store is filled up to 32 MiB of free space with an
// allocated (never written) file first, so the golden can stay small: the first version sent
// 600 MB of random data into an empty 512 MB store, and on a CI machine busy with two guests its
// export alone took four minutes.
func TestReceiveOutOfSpace(t *testing.T) {
	base := newBase(t)
	a := newEnv(t, filepath.Join(base, "a"), filepath.Join(base, "a", "root"), nil)
	b := newEnv(t, filepath.Join(base, "b"), filepath.Join(base, "b", "root"), func(c *reflinkstore.Config) { c.StoreSize = 512 << 20 })
	ctx := testCtx(t)
	src := t.TempDir()
	data := make([]byte, 96<<20) // random, so neither the image nor the stream is sparse
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(src, "big"), string(data))
	if _, err := a.d.Import(ctx, "big", driver.KindBlock, src, driver.ImportOptions{}, nil); err != nil {
		t.Fatal(err)
	}
	var stream bytes.Buffer
	if _, err := a.d.Export(ctx, "big", 0, 0, &stream); err != nil {
		t.Fatal(err)
	}
	filler := fillStore(t, b, 32<<20)
	_, err := b.d.Receive(ctx, "big", &stream)
	if !errors.Is(err, driver.ErrNoSpace) || !strings.Contains(err.Error(), "nothing of the stream was kept") {
		t.Fatalf("receive into a store too small: %v; want ErrNoSpace saying nothing was kept", err)
	}
	t.Logf("the error a user sees: %v", err)
	if got := b.storeEntries(t, "goldens"); len(got) > 0 {
		t.Fatalf("a failed receive left %v", got)
	}
	if gs, err := b.d.Goldens(ctx); err != nil || len(gs) > 0 {
		t.Fatalf("a failed receive left goldens %+v (%v)", gs, err)
	}
	assertNoImageLoops(t, b)
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	b.create(t, "ok", nil)
	writeFile(t, filepath.Join(b.mount(t, "ok", "c"), "f"), "fine")
	b.unmount(t, "ok", "c")
	b.remove(t, "ok")
	for _, e := range []*env{a, b} {
		e.finish(t)
	}
}

// fillStore allocates a file in e's store filesystem that leaves it about free bytes, and returns
// its path. fallocate reserves the blocks without writing them, so it costs no time.
func fillStore(t *testing.T, e *env, free int64) string {
	t.Helper()
	dir := filepath.Join(e.root, "store")
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	avail := int64(st.Bavail) * st.Bsize
	if avail <= free {
		t.Fatalf("the store at %s has only %d bytes free, want more than %d", dir, avail, free)
	}
	path := filepath.Join(dir, "test-filler")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fallocate(int(f.Fd()), 0, 0, avail-free); err != nil {
		t.Fatalf("fill the store: %v", err)
	}
	return path
}
