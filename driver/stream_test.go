package driver

import (
	"errors"
	"io"
	"strings"
	"testing"
)

// TestReadStreamHeader: a golden stream's header is checked before a byte of it reaches the
// backend, and the bytes after it are passed on untouched.
func TestReadStreamHeader(t *testing.T) {
	good := `{"format":"zgolden-golden-stream/1","backend":"zfs","project":"prj","kind":"block","generation":3,"guid":"123","base":2,"base_guid":"456"}`
	h, rest, err := ReadStreamHeader(strings.NewReader(good + "\nPAYLOAD\n"))
	if err != nil || h.Project != "prj" || h.Generation != 3 || h.Base != 2 || h.BaseGUID != "456" {
		t.Fatalf("ReadStreamHeader(good) = %+v, %v", h, err)
	}
	if b, _ := io.ReadAll(rest); string(b) != "PAYLOAD\n" {
		t.Fatalf("the bytes after the header: %q", b)
	}
	for name, in := range map[string]string{
		"empty":             "",
		"not json":          "hello\nrest",
		"no newline, huge":  strings.Repeat("x", maxHeader+10),
		"another format":    strings.Replace(good, "stream/1", "stream/9", 1) + "\n",
		"unknown field":     strings.Replace(good, `"kind"`, `"evil":1,"kind"`, 1) + "\n",
		"bad project":       strings.Replace(good, `"prj"`, `"../x"`, 1) + "\n",
		"base not older":    strings.Replace(good, `"base":2`, `"base":3`, 1) + "\n",
		"base without guid": strings.Replace(good, `,"base_guid":"456"`, ``, 1) + "\n",
		"no guid":           strings.Replace(good, `"guid":"123",`, ``, 1) + "\n",
		"bad kind":          strings.Replace(good, `"block"`, `"tape"`, 1) + "\n",
		"generation 0":      strings.Replace(strings.Replace(good, `"generation":3`, `"generation":0`, 1), `"base":2,"base_guid":"456"`, `"base":0`, 1) + "\n",
	} {
		if _, _, err := ReadStreamHeader(strings.NewReader(in)); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v; want ErrInvalid", name, err)
		}
	}
}

// TestTransferNeedsATransferer: a backend that cannot move goldens says so, naming itself.
func TestTransferNeedsATransferer(t *testing.T) {
	d := newTestDriver(t, newFake(), "")
	if _, err := d.Export(t.Context(), "p", 0, 0, io.Discard); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "cannot export") {
		t.Errorf("Export on a backend without transfers: %v", err)
	}
	if _, err := d.Receive(t.Context(), "p", strings.NewReader("")); !errors.Is(err, ErrInvalid) {
		t.Errorf("Receive on a backend without transfers: %v", err)
	}
}
