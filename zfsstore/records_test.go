package zfsstore

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"

	"github.com/zgolden/zgolden/internal/recordfile"
)

// recordsOnly is a store with a record directory and nothing else: enough for the records, which
// touch no ZFS.
func recordsOnly(t *testing.T, recordDir string) *Store {
	t.Helper()
	s := &Store{cfg: Config{Parent: "tank/zg", RecordDir: recordDir}, log: logrus.NewEntry(logrus.StandardLogger())}
	t.Cleanup(func() { _ = s.closeRecords() })
	return s
}

// TestRecordsOfAnEarlierReleaseMove: the JSON files an earlier release wrote, one per record, are
// moved into the record file at the first read, whole, and their files deleted; a temporary that
// a crash left inside that release's write is dropped.
func TestRecordsOfAnEarlierReleaseMove(t *testing.T) {
	dir := t.TempDir()
	old := filepath.Join(dir, "tank%zg")
	files := map[string]string{
		"a.json":                          `{"name":"a","dataset":"tank/zg/spare/x1","golden":"prj","generation":2,"created":1,"size":8192}`,
		".tmp-123":                        `{"name":"torn`,
		"removing/tank%zg%vol%b.json":     `{"name":"b","dataset":"tank/zg/vol/b","removed":5}`,
		"removing/tank%zg%spare%x2.json":  `{"name":"c","dataset":"tank/zg/spare/x2","removed":6,"then":"tank/zg/vol/c"}`,
		"removing/.tmp-456":               `{`,
		"removing/not-a-record-file.txt":  `left alone`,
		"../tank%other/z.json":            `{"name":"z","dataset":"tank/other/spare/z"}`,
		"../tank%other/removing/q.json":   `{"name":"q","dataset":"tank/other/vol/q"}`,
		"../tank%other/unrelated.journal": ``,
	}
	for name, data := range files {
		p := filepath.Join(old, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	s := recordsOnly(t, dir)
	claims, err := s.claimRecords()
	if err != nil {
		t.Fatal(err)
	}
	if len(claims) != 1 || claims[0].Name != "a" || claims[0].Dataset != "tank/zg/spare/x1" || claims[0].Generation != 2 || claims[0].Size != 8192 {
		t.Fatalf("claims after the move: %+v", claims)
	}
	removals, err := s.removalRecords()
	if err != nil {
		t.Fatal(err)
	}
	if len(removals) != 2 || removals[0].Dataset != "tank/zg/spare/x2" || removals[0].Then != "tank/zg/vol/c" || removals[1].Name != "b" {
		t.Fatalf("removals after the move: %+v", removals)
	}
	var left []string
	_ = filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() {
			left = append(left, strings.TrimPrefix(p, dir+"/"))
		}
		return nil
	})
	slices.Sort(left)
	want := []string{"tank%other/removing/q.json", "tank%other/unrelated.journal", "tank%other/z.json", "tank%zg/records", "tank%zg/removing/not-a-record-file.txt"}
	if !slices.Equal(left, want) {
		t.Fatalf("files after the move: %v\nwant %v (another parent's records are its own)", left, want)
	}
	// On disk, not only in memory: a second store reads the same.
	keys, err := recordfile.ReadKeys(RecordFile(dir, "tank/zg"))
	if err != nil || !slices.Equal(keys, []string{"claim/a", "removal/tank/zg/spare/x2", "removal/tank/zg/vol/b"}) {
		t.Fatalf("record file keys: %v, %v", keys, err)
	}
}

// TestInvalidRecordsStopLoad: a record that names something outside this parent, or that is not
// a record at all, stops the read with a message that says which record and where, instead of
// being acted on or silently dropped.
func TestInvalidRecordsStopLoad(t *testing.T) {
	for name, c := range map[string]struct{ key, val, want string }{
		"claim of another parent":  {"claim/a", `{"name":"a","dataset":"tank/other/spare/x"}`, "names no spare of this parent"},
		"claim under another name": {"claim/a", `{"name":"b","dataset":"tank/zg/spare/x"}`, "names no spare of this parent"},
		"removal outside":          {"removal/tank/zg/vol/b", `{"name":"b","dataset":"tank/zg/vol/c"}`, "names no dataset"},
		"removal of the pool":      {"removal/tank", `{"name":"b","dataset":"tank"}`, "names no dataset"},
		"not JSON":                 {"claim/a", `{"name":`, "invalid"},
	} {
		t.Run(name, func(t *testing.T) {
			s := recordsOnly(t, t.TempDir())
			rf, err := s.recordFile()
			if err != nil {
				t.Fatal(err)
			}
			if err := rf.Put(c.key, []byte(c.val)); err != nil {
				t.Fatal(err)
			}
			_, cerr := s.claimRecords()
			_, rerr := s.removalRecords()
			err = cerr
			if strings.HasPrefix(c.key, removalKey) {
				err = rerr
			}
			if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), c.key) || !strings.Contains(err.Error(), rf.Path()) {
				t.Fatalf("reading %s = %s: %v; want an error naming the record, its file, and %q", c.key, c.val, err, c.want)
			}
		})
	}
}
