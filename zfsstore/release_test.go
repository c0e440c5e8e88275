package zfsstore_test

import (
	"bytes"
	"compress/gzip"
	"context"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/driver/drivertest"
	"github.com/zgolden/zgolden/tests/harness"
)

// goldenFixture is a golden stream that zgolden made on the newest release of the test bed
// (zfs 2.4 on Debian 13: kernel 6.12, xfsprogs 6.x), written by TestWriteGoldenFixture in that
// guest (`make golden-fixture`), for every release to receive.
const goldenFixture = "testdata/golden-zfs-2.4.zgs.gz"

// TestReceiveGoldenFromAnotherRelease receives the golden made on zfs 2.4 and Debian 13's
// xfsprogs here, on whatever release this guest runs (2.1 with kernel 6.1 in CI's compat
// guest): the stream goes in, the receiver's own check mounts its XFS read-only before the
// generation becomes visible, and a clone of it mounts read-write with the whole tree. A golden
// formatted with XFS features this kernel lacks would fail at that check.
func TestReceiveGoldenFromAnotherRelease(t *testing.T) {
	f, err := os.Open(goldenFixture)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	h := newHost(t, harness.ZFSParent(t))
	ctx := context.Background()
	gen, err := h.d.Receive(ctx, "prj", zr)
	if err != nil {
		t.Fatalf("receive the golden made on zfs 2.4: %v", err)
	}
	t.Logf("received generation %d (guid %s) on %s", gen.Number, gen.GUID, harness.Run(t, "uname", "-r"))
	if err := h.d.Create(ctx, "from-2.4", map[string]string{"golden": "prj"}); err != nil {
		t.Fatal(err)
	}
	mp, err := h.d.Mount(ctx, "from-2.4", "check")
	if err != nil {
		t.Fatalf("mount a clone of the golden made on zfs 2.4: %v", err)
	}
	drivertest.CheckTree(t, mp)
	if err := os.WriteFile(filepath.Join(mp, "written-here"), []byte("ok"), 0o644); err != nil {
		t.Fatalf("write into the clone: %v", err)
	}
	if err := h.d.Unmount(ctx, "from-2.4", "check"); err != nil {
		t.Fatal(err)
	}
	if err := h.d.Remove(ctx, "from-2.4"); err != nil {
		t.Fatal(err)
	}
	if err := h.d.RemoveGolden(ctx, "prj", false); err != nil {
		t.Fatal(err)
	}
}

// TestWriteGoldenFixture writes goldenFixture, when ZGOLDEN_GOLDEN_FIXTURE names where: a golden
// of drivertest's tree, imported and exported by zgolden on this guest's release. `make
// golden-fixture` runs it in the zfs 2.4 guest and copies the file into the tree.
func TestWriteGoldenFixture(t *testing.T) {
	out := os.Getenv("ZGOLDEN_GOLDEN_FIXTURE")
	if out == "" {
		t.Skip("ZGOLDEN_GOLDEN_FIXTURE is not set: nothing to write")
	}
	h := newHost(t, harness.ZFSParent(t))
	ctx := context.Background()
	src := t.TempDir()
	drivertest.MakeTree(t, src)
	if _, err := h.d.Import(ctx, "prj", driver.KindBlock, src, driver.ImportOptions{}, nil); err != nil {
		t.Fatal(err)
	}
	var stream bytes.Buffer
	if _, err := h.d.Export(ctx, "prj", 0, 0, &stream); err != nil {
		t.Fatal(err)
	}
	raw := stream.Len()
	var gz bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&gz, gzip.BestCompression)
	if _, err := io.Copy(zw, &stream); err != nil || zw.Close() != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(out, gz.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("wrote %s: %d bytes (%d before gzip) on %s", out, gz.Len(), raw, harness.Run(t, "uname", "-r"))
	if err := h.d.RemoveGolden(ctx, "prj", false); err != nil {
		t.Fatal(err)
	}
}
