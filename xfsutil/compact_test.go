package xfsutil

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/zgolden/zgolden/tests/harness"
)

// extentCount counts a file's extents with FIEMAP (fm_extent_count 0 returns only the count).
func extentCount(t *testing.T, f *os.File) int {
	t.Helper()
	var hdr fiemapHeader
	hdr.Length = ^uint64(0)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), fsIocFiemap, uintptr(unsafe.Pointer(&hdr))); errno != 0 {
		t.Fatalf("FIEMAP: %v", errno)
	}
	return int(hdr.Mapped)
}

// TestCopyCompact: a file whose data was written in scattered order (logically adjacent,
// physically apart, as loop writeback leaves an image), with a hole, is copied with the same
// contents, size and hole, sharing nothing, in a handful of extents.
func TestCopyCompact(t *testing.T) {
	dir := harness.LoopFS(t, "xfs", 2<<30)
	src, err := os.Create(filepath.Join(dir, "src.img"))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	// 256 adjacent runs of 16 KiB written back to front, each synced with an unrelated
	// allocation in between, so each lands in its own extent; then a hole; then 4 MiB at 32 MiB.
	block := bytes.Repeat([]byte("zgolden!"), 2048)
	for i := 255; i >= 0; i-- {
		block[0] = byte(i)
		if _, err := src.WriteAt(block, int64(i)*16384); err != nil {
			t.Fatal(err)
		}
		if err := src.Sync(); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "spacer"+strconv.Itoa(i)), block, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := src.WriteAt(bytes.Repeat(block, 256), 32<<20); err != nil {
		t.Fatal(err)
	}
	if err := src.Truncate(64 << 20); err != nil {
		t.Fatal(err)
	}
	if err := src.Sync(); err != nil {
		t.Fatal(err)
	}
	dst, err := os.Create(filepath.Join(dir, "dst.img"))
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	if err := CopyCompact(context.Background(), dst, src); err != nil {
		t.Fatal(err)
	}
	if err := dst.Sync(); err != nil {
		t.Fatal(err)
	}
	a, _ := os.ReadFile(src.Name())
	b, _ := os.ReadFile(dst.Name())
	if !bytes.Equal(a, b) {
		t.Fatal("the compact copy's contents differ from the source")
	}
	ext, err := FileExtents(dst)
	if err != nil {
		t.Fatal(err)
	}
	if ext.Shared != 0 {
		t.Fatalf("the copy shares %d bytes with the source; it must be a real copy", ext.Shared)
	}
	if ext.Allocated != 8<<20 {
		t.Fatalf("the copy allocates %d bytes, want %d: the hole must stay a hole", ext.Allocated, 8<<20)
	}
	before, after := extentCount(t, src), extentCount(t, dst)
	t.Logf("extents: source %d, compact copy %d", before, after)
	if after > 4 {
		t.Fatalf("the compact copy has %d extents (source %d); want at most 4", after, before)
	}
}

func TestParseMkfsVersion(t *testing.T) {
	for in, want := range map[string][2]int{"mkfs.xfs version 6.13.0\n": {6, 13}, "mkfs.xfs version 6.1.0": {6, 1}, "mkfs.xfs version 5.19": {5, 19}, "no version": {}, "mkfs.xfs version x.1": {}} {
		if got := parseMkfsVersion(in); got != want {
			t.Errorf("parseMkfsVersion(%q) = %v, want %v", in, got, want)
		}
	}
}
