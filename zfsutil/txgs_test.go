package zfsutil

import (
	"errors"
	"testing"
	"time"

	"github.com/zgolden/zgolden/internal/command"
)

// What /proc/spl/kstat/zfs/zgt/txgs printed in the guest (zfs 2.1.11), with a txg still open.
const txgsSample = `18 0 0x01 5 560 23153985030 29480521430
txg      birth            state ndirty       nread        nwritten     reads    writes   otime        qtime        wtime        stime       
5        23153985030      C     0            0            274432       0        41       154610820    63250        112250       60159450    
6        23308595850      C     12582912     4096         13000704     1        300      5000000000   50000        100000       21500000000 
7        28308645850      O     0            0            0            0        0        0            0            0            0           
`

func TestParseTxgs(t *testing.T) {
	txgs, err := ParseTxgs(txgsSample)
	if err != nil {
		t.Fatal(err)
	}
	if len(txgs) != 3 {
		t.Fatalf("got %d txgs, want 3: %+v", len(txgs), txgs)
	}
	got := txgs[1]
	want := TxgSync{Txg: 6, Dirty: 12582912, Written: 13000704, Open: 5 * time.Second, Sync: 21500 * time.Millisecond, Complete: true}
	if got != want {
		t.Fatalf("txg 6: got %+v, want %+v", got, want)
	}
	if txgs[2].Complete {
		t.Fatal("txg 7 is open (state O), not synced")
	}
	if _, err := ParseTxgs("garbage\n"); err == nil {
		t.Fatal("a kstat with no column header parsed")
	}
}

// TestClassifyProgram: what the clone program's failures print maps to the sentinel errors.
func TestClassifyProgram(t *testing.T) {
	const head = "Channel program execution failed:\n[string \"channel program\"]:6: "
	for stderr, want := range map[string]error{
		head + "zgolden: clone p/vol/a: errno 17":           ErrExists,
		head + "zgolden: clone p/vol/a: errno 2":            ErrNotFound,
		head + "zgolden: clone p/vol/a: errno 28":           ErrNoSpace,
		head + "zgolden: set zgolden:x on p/vol/a: errno 7": nil,
		head + "zgolden: no zfs.sync.clone":                 ErrNoOneTaskClone,
		"cannot open pool 'p'":                              nil,
	} {
		err := classifyProgram(&command.Error{Argv: []string{"zfs", "program"}, Stderr: stderr, Err: errors.New("exit status 1")})
		for _, kind := range []error{ErrExists, ErrNotFound, ErrNoSpace, ErrNoOneTaskClone} {
			if errors.Is(err, kind) != (kind == want) {
				t.Errorf("classifyProgram(%q) = %v; errors.Is %v = %v", stderr, err, kind, !(kind == want))
			}
		}
	}
}

func TestParseHumanSize(t *testing.T) {
	for in, want := range map[string]uint64{"256B": 256, "1.5K": 1536, "3M": 3 << 20, "160B,": 160, "2": 2} {
		if got, ok := parseHumanSize(in); !ok || got != want {
			t.Errorf("parseHumanSize(%q) = %d, %v; want %d", in, got, ok, want)
		}
	}
	if _, ok := parseHumanSize("lots"); ok {
		t.Error("parseHumanSize accepted lots")
	}
}
