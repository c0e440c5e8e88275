package recordfile

import (
	"errors"
	"path/filepath"
	"testing"
)

// TestLazy: the file is opened at the first use only, an open that failed is tried again, a
// closed one is opened again, and PutJSON writes the value's JSON.
func TestLazy(t *testing.T) {
	path := filepath.Join(t.TempDir(), "records")
	var l Lazy
	opens, fail := 0, true
	open := func() (*File, error) {
		opens++
		if fail {
			return nil, errors.New("not yet")
		}
		return Open(path)
	}
	if _, err := l.File(open); err == nil {
		t.Fatal("File returned no error from a failing open")
	}
	fail = false
	rf, err := l.File(open)
	if err != nil {
		t.Fatal(err)
	}
	if again, err := l.File(open); err != nil || again != rf || opens != 2 {
		t.Fatalf("a second File = %p, %v after %d opens; want the same file %p after 2", again, err, opens, rf)
	}
	if err := rf.PutJSON("claim/a", map[string]string{"name": "a"}); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	rf, err = l.File(open)
	if err != nil || opens != 3 {
		t.Fatalf("File after Close = %v after %d opens; want a new open, the third", err, opens)
	}
	if got := get(t, rf, "claim/a"); got != `{"name":"a"}` {
		t.Fatalf("claim/a = %s after a reopen", got)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
}
