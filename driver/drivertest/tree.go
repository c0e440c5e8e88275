package drivertest

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// TreeFiles is how many small files MakeTree writes.
const TreeFiles = 300

// MakeTree fills dir with what a golden holds and cp -a must preserve: many small files in
// nested directories, a symlink, a hard link, an extended attribute, odd ownership and modes, and
// a sparse file.
func MakeTree(t testing.TB, dir string) {
	t.Helper()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < TreeFiles; i++ {
		sub := filepath.Join(dir, "layers", fmt.Sprintf("d%02d", i%17))
		must(os.MkdirAll(sub, 0o755))
		must(os.WriteFile(filepath.Join(sub, fmt.Sprintf("f%04d", i)), fileContent(i), 0o644))
	}
	must(os.WriteFile(filepath.Join(dir, "README"), []byte("golden content\n"), 0o640))
	must(os.Symlink("layers/d01/f0001", filepath.Join(dir, "link")))
	must(os.Link(filepath.Join(dir, "README"), filepath.Join(dir, "README.hard")))
	must(unix.Setxattr(filepath.Join(dir, "README"), "user.zgolden", []byte("xattr-kept"), 0))
	must(os.Chown(filepath.Join(dir, "README"), 1234, 5678))
	must(os.Chmod(filepath.Join(dir, "README"), 0o640))
	sparse, err := os.Create(filepath.Join(dir, "sparse.img"))
	must(err)
	must(sparse.Truncate(64 << 20))
	_, err = sparse.WriteAt([]byte("end"), 64<<20-3)
	must(err)
	must(sparse.Close())
}

func fileContent(i int) []byte {
	return bytes.Repeat([]byte(fmt.Sprintf("file %d\n", i)), 1+i%50)
}

// CheckTree verifies that dir holds what MakeTree made, file by file.
func CheckTree(t testing.TB, dir string) {
	t.Helper()
	for i := 0; i < TreeFiles; i++ {
		p := filepath.Join(dir, "layers", fmt.Sprintf("d%02d", i%17), fmt.Sprintf("f%04d", i))
		got, err := os.ReadFile(p)
		if err != nil {
			t.Fatalf("golden file missing: %v", err)
		}
		if !bytes.Equal(got, fileContent(i)) {
			t.Fatalf("%s: content differs from the golden", p)
		}
	}
	target, err := os.Readlink(filepath.Join(dir, "link"))
	if err != nil || target != "layers/d01/f0001" {
		t.Fatalf("symlink: got %q, %v", target, err)
	}
	var a, b syscall.Stat_t
	if err := syscall.Lstat(filepath.Join(dir, "README"), &a); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Lstat(filepath.Join(dir, "README.hard"), &b); err != nil {
		t.Fatal(err)
	}
	if a.Ino != b.Ino || a.Nlink != 2 {
		t.Fatalf("hard link not preserved: inodes %d and %d, nlink %d", a.Ino, b.Ino, a.Nlink)
	}
	if a.Uid != 1234 || a.Gid != 5678 || a.Mode&0o777 != 0o640 {
		t.Fatalf("ownership or mode not preserved: uid %d gid %d mode %o", a.Uid, a.Gid, a.Mode&0o777)
	}
	buf := make([]byte, 64)
	n, err := unix.Getxattr(filepath.Join(dir, "README"), "user.zgolden", buf)
	if err != nil || string(buf[:n]) != "xattr-kept" {
		t.Fatalf("xattr not preserved: %q, %v", buf[:max(n, 0)], err)
	}
	var s syscall.Stat_t
	if err := syscall.Stat(filepath.Join(dir, "sparse.img"), &s); err != nil {
		t.Fatal(err)
	}
	if s.Size != 64<<20 || s.Blocks*512 >= 8<<20 {
		t.Fatalf("sparse file: size %d, allocated %d bytes; want 64 MiB apparent and little allocated", s.Size, s.Blocks*512)
	}
}
