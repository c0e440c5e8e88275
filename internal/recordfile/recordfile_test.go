package recordfile

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
)

func open(t *testing.T, path string) *File {
	t.Helper()
	rf, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rf.Close() })
	return rf
}

func get(t *testing.T, rf *File, key string) string {
	t.Helper()
	v, ok := rf.Get(key)
	if !ok {
		return "<none>"
	}
	return string(v)
}

func TestPutDeleteSurviveReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "records")
	rf := open(t, path)
	for k, v := range map[string]string{"claim/a": `{"a":1}`, "claim/b": `{"b":2}`, "removal/x": "x"} {
		if err := rf.Put(k, []byte(v)); err != nil {
			t.Fatal(err)
		}
	}
	if err := rf.Put("claim/a", []byte(`{"a":2}`)); err != nil { // a rewrite
		t.Fatal(err)
	}
	if err := rf.Delete("claim/b"); err != nil {
		t.Fatal(err)
	}
	if err := rf.Delete("never/there"); err != nil {
		t.Fatalf("deleting a key with no record: %v", err)
	}
	rf.Close()

	rf2 := open(t, path)
	if got := rf2.Keys(); !slices.Equal(got, []string{"claim/a", "removal/x"}) {
		t.Fatalf("keys after reopen: %v", got)
	}
	if got := get(t, rf2, "claim/a"); got != `{"a":2}` {
		t.Fatalf("claim/a after reopen: %s, want the rewrite", got)
	}
	if keys, err := ReadKeys(path); err != nil || !slices.Equal(keys, []string{"claim/a", "removal/x"}) {
		t.Fatalf("ReadKeys: %v, %v", keys, err)
	}
	if keys, err := ReadKeys(filepath.Join(t.TempDir(), "none")); err != nil || len(keys) != 0 {
		t.Fatalf("ReadKeys of no file: %v, %v", keys, err)
	}
}

// TestWritesAllocateNothing: once open, a Put or Delete changes neither the file's size nor its
// allocated blocks, which is what keeps the filesystem's journal out of their fsync.
func TestWritesAllocateNothing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "records")
	rf := open(t, path)
	size := func() (int64, int64) {
		var st syscall.Stat_t
		if err := syscall.Stat(path, &st); err != nil {
			t.Fatal(err)
		}
		return st.Size, st.Blocks
	}
	s0, b0 := size()
	if s0 != initialSlots*SlotSize || b0*512 < s0 {
		t.Fatalf("a new record file is %d bytes in %d blocks; want %d bytes, all allocated", s0, b0, initialSlots*SlotSize)
	}
	for i := 0; i < initialSlots-1; i++ {
		if err := rf.Put(fmt.Sprintf("k%d", i), []byte(strings.Repeat("v", 300))); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < initialSlots-1; i += 2 {
		if err := rf.Delete(fmt.Sprintf("k%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	if s, b := size(); s != s0 || b != b0 {
		t.Fatalf("writes changed the file from %d bytes/%d blocks to %d/%d", s0, b0, s, b)
	}
}

func TestGrowsBeyondItsSlots(t *testing.T) {
	path := filepath.Join(t.TempDir(), "records")
	rf := open(t, path)
	n := initialSlots*2 + 5
	for i := 0; i < n; i++ {
		if err := rf.Put(fmt.Sprintf("k%03d", i), []byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	rf.Close()
	rf2 := open(t, path)
	if got := len(rf2.Keys()); got != n {
		t.Fatalf("%d records after reopen, want %d", got, n)
	}
	if v, ok := rf2.Get("k130"); !ok || v[0] != 130 {
		t.Fatalf("k130: %v %v", v, ok)
	}
}

// TestTornAndStaleSlots: what a crash can leave. A slot whose checksum fails is a write that
// never returned, and counts as free; two records of one key (a crash between a rewrite and the
// clearing of the old slot) resolve to the newer, and the older is cleared so that a later
// Delete cannot bring it back; a partial last slot is dropped.
func TestTornAndStaleSlots(t *testing.T) {
	path := filepath.Join(t.TempDir(), "records")
	rf := open(t, path)
	for _, k := range []string{"a", "b"} {
		if err := rf.Put(k, []byte("v1-"+k)); err != nil {
			t.Fatal(err)
		}
	}
	rf.Close()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	// Slot 0 holds a, slot 1 b. Tear b; write an older a (seq 0) into slot 2, and a newer a
	// into slot 3, as a rewrite whose old slot was never cleared; leave half a slot at the end.
	data[SlotSize+headerSize] ^= 0xff
	copy(data[2*SlotSize:], encode("a", []byte("v0-a"), 0))
	copy(data[3*SlotSize:], encode("a", []byte("v2-a"), 99))
	data = append(data, make([]byte, SlotSize/2)...)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	rf2 := open(t, path)
	if got := rf2.Keys(); !slices.Equal(got, []string{"a"}) {
		t.Fatalf("keys: %v; want only a (b's slot is torn)", got)
	}
	if got := get(t, rf2, "a"); got != "v2-a" {
		t.Fatalf("a = %s, want the newest, v2-a", got)
	}
	if st, _ := os.Stat(path); st.Size()%SlotSize != 0 {
		t.Fatalf("the partial slot stayed: %d bytes", st.Size())
	}
	if err := rf2.Put("c", []byte("new")); err != nil { // seq must pass 99
		t.Fatal(err)
	}
	if err := rf2.Delete("a"); err != nil {
		t.Fatal(err)
	}
	rf2.Close()
	rf3 := open(t, path)
	if got := rf3.Keys(); !slices.Equal(got, []string{"c"}) {
		t.Fatalf("keys after deleting a: %v; an older copy of a came back", got)
	}
}

func TestRefusesARecordThatDoesNotFit(t *testing.T) {
	rf := open(t, filepath.Join(t.TempDir(), "records"))
	if err := rf.Put("k", make([]byte, MaxRecord)); err == nil || !strings.Contains(err.Error(), "fit a slot") {
		t.Fatalf("an oversize record: %v", err)
	}
	if err := rf.Put("", []byte("v")); err == nil {
		t.Fatal("an empty key was accepted")
	}
	if err := rf.Put("k", make([]byte, MaxRecord-1)); err != nil {
		t.Fatalf("a record that just fits: %v", err)
	}
}
