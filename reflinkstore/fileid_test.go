package reflinkstore

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestFileIDOutlivesInodeReuse: a file made after another was deleted can get its inode number,
// which is why a spare names its generation image by fileID (spares.go), not by the number alone.
func TestFileIDOutlivesInodeReuse(t *testing.T) {
	dir := t.TempDir()
	first := filepath.Join(dir, "gen")
	if err := os.WriteFile(first, []byte("a"), 0o600); err != nil {
		t.Fatal(err)
	}
	old, err := fileID(first)
	if err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Stat(first, &st); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(first); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 200; i++ {
		p := filepath.Join(dir, "new")
		if err := os.WriteFile(p, []byte("b"), 0o600); err != nil {
			t.Fatal(err)
		}
		var nst unix.Stat_t
		if err := unix.Stat(p, &nst); err != nil {
			t.Fatal(err)
		}
		if nst.Ino == st.Ino {
			id, err := fileID(p)
			if err != nil {
				t.Fatal(err)
			}
			if id == old {
				t.Fatalf("a new file with the deleted one's inode %d has its identity %s", st.Ino, id)
			}
			t.Logf("inode %d reused after %d files: %s, then %s", st.Ino, i+1, old, id)
			return
		}
		// Keep this one, so the next file gets a fresh number unless the freed one comes back.
		if err := os.Rename(p, filepath.Join(dir, "keep-"+string(rune('a'+i%26))+string(rune('a'+i/26)))); err != nil {
			t.Fatal(err)
		}
	}
	t.Skip("the filesystem under the test's temporary directory did not reuse the inode number in 200 files")
}
