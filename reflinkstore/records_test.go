package reflinkstore_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/zgolden/zgolden/internal/recordfile"
	"github.com/zgolden/zgolden/reflinkstore"
)

// fileIDOf is path's file ID, as the store records it.
func fileIDOf(t *testing.T, path string) string {
	t.Helper()
	id, err := reflinkstore.FileID(path)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// recordKeys lists the records in the store's record file.
func recordKeys(t *testing.T, e *env) []string {
	t.Helper()
	keys, err := recordfile.ReadKeys(reflinkstore.RecordFile(e.root))
	if err != nil {
		t.Fatal(err)
	}
	return keys
}

// waitNoRecords waits until the syncer has deleted every record: the renames they covered are
// on disk.
func waitNoRecords(t *testing.T, e *env) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(20 * time.Millisecond) {
		st, err := e.store.Status(testCtx(t))
		keys := recordKeys(t, e)
		if err == nil && st.ClaimsPending == 0 && st.RemovedPending == 0 && len(keys) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("a minute on, records %v remain (claims pending %d, removals %d, %v)", keys, st.ClaimsPending, st.RemovedPending, err)
		}
	}
}

// TestRecordsAreTheTruthAfterACrash: a claim or a Remove returns once its record is written, and
// syncs the directory after. A host crash in between can lose the rename while the record stays;
// the next start carries each record out again. The crash is made here by undoing the renames by
// hand and writing the records that would have been left, with the store stopped as by kill -9.
func TestRecordsAreTheTruthAfterACrash(t *testing.T) {
	base := newBase(t)
	e := newEnv(t, base, filepath.Join(base, "zg"), nil)
	e.importTree(t, "prj")
	vols := filepath.Join(e.root, "store", "volumes")
	spares := filepath.Join(e.root, "store", "spares")
	img := func(name string) string { return filepath.Join(vols, name+".img") }
	for _, v := range []string{"a", "b", "c", "d", "e", "e2", "f"} {
		e.create(t, v, map[string]string{"golden": "prj"})
	}
	mp := e.mount(t, "a", "c")
	writeFile(t, filepath.Join(mp, "mine"), "a")
	e.unmount(t, "a", "c") // a's XFS stays at its kept mount

	// The Remove that returns: its record is deleted once the rename and the unlink are synced.
	e.remove(t, "c")
	waitNoRecords(t, e)

	// The state a host crash could leave.
	unclaim := func(name string) string { // a claim whose rename was lost: the image is a spare again
		t.Helper()
		sp := filepath.Join(spares, "prj-"+name+".img")
		if err := os.MkdirAll(spares, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(img(name), sp); err != nil {
			t.Fatal(err)
		}
		return fileIDOf(t, sp)
	}
	claim := func(name string) []byte {
		b, _ := json.Marshal(map[string]string{"name": name, "created": "1700000000"})
		return b
	}
	removal := func(name string) []byte {
		b, _ := json.Marshal(map[string]string{"name": name})
		return b
	}
	idA := fileIDOf(t, img("a"))
	idB := unclaim("b") // claimed as b
	idD := unclaim("d") // claimed as d, then removed
	idE := fileIDOf(t, img("e"))
	idE2 := unclaim("e2") // e removed, then claimed again as e
	records := map[string][]byte{
		"removal/" + idA:   removal("a"),
		"claim/" + idB:     claim("b"),
		"claim/" + idD:     claim("d"),
		"removal/" + idD:   removal("d"),
		"removal/" + idE:   removal("e"),
		"claim/" + idE2:    claim("e"),
		"removal/1.2.3":    removal("f"), // an image f no longer has: f stays
		"claim/" + "4.5.6": claim("g"),   // a claimed spare deleted since: nothing to do
	}
	reflinkstore.StopSpareWorker(e.store)
	rf, err := recordfile.Open(reflinkstore.RecordFile(e.root))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range records {
		if err := rf.Put(k, v); err != nil {
			t.Fatal(err)
		}
	}
	rf.Close()

	e.open(t)
	var names []string
	for _, v := range e.d.List() {
		names = append(names, v.Name)
	}
	slices.Sort(names)
	if want := []string{"b", "e", "f"}; !slices.Equal(names, want) {
		t.Fatalf("after the start the volumes are %v, want %v", names, want)
	}
	if got := fileIDOf(t, img("b")); got != idB {
		t.Errorf("b's image is %s, want the claimed spare %s", got, idB)
	}
	if got := fileIDOf(t, img("e")); got != idE2 {
		t.Errorf("e's image is %s, want the spare claimed after e's removal, %s", got, idE2)
	}
	if left := inodes(t, spares); len(left) > 0 {
		t.Errorf("spares left after the start: %v", left)
	}
	if keys := recordKeys(t, e); len(keys) > 0 {
		t.Errorf("records left after the start: %v", keys)
	}
	for _, dir := range []string{"volumes", "spares"} {
		if entries := e.storeEntries(t, dir); slices.ContainsFunc(entries, func(n string) bool { return strings.HasPrefix(n, ".tmp-") }) {
			t.Errorf("temporary images left in %s after the start: %v", dir, entries)
		}
	}
	// The claimed spare is a whole volume: it mounts, and a new a starts empty.
	e.mount(t, "b", "c")
	e.unmount(t, "b", "c")
	e.create(t, "a", nil)
	amp := e.mount(t, "a", "c")
	if _, err := os.Stat(filepath.Join(amp, "mine")); !os.IsNotExist(err) {
		t.Errorf("a new volume a finds the removed a's file: %v", err)
	}
	e.unmount(t, "a", "c")
	for _, v := range []string{"a", "b", "e", "f"} {
		e.remove(t, v)
	}
	waitNoRecords(t, e)
	e.finish(t)
}

// TestInvalidRecordsStopTheStart: a record the store cannot have written stops the start with an
// error naming it and its file, rather than be carried out or dropped.
func TestInvalidRecordsStopTheStart(t *testing.T) {
	base := newBase(t)
	e := newEnv(t, base, filepath.Join(base, "zg"), nil)
	reflinkstore.StopSpareWorker(e.store)
	put := func(key, val string, del bool) {
		t.Helper()
		rf, err := recordfile.Open(reflinkstore.RecordFile(e.root))
		if err != nil {
			t.Fatal(err)
		}
		defer rf.Close()
		if del {
			err = rf.Delete(key)
		} else {
			err = rf.Put(key, []byte(val))
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	for name, c := range map[string]struct{ key, val, want string }{
		"not JSON":             {"claim/1.2.3", `{"name":`, "unexpected end"},
		"a bad name":           {"removal/1.2.3", `{"name":"../x"}`, "invalid"},
		"a bad time":           {"claim/1.2.3", `{"name":"v","created":"soon"}`, "creation time"},
		"an unknown kind":      {"other/1.2.3", `{}`, "neither a claim nor a removal"},
		"a claim with no name": {"claim/1.2.3", `{"created":"1"}`, "invalid"},
	} {
		t.Run(name, func(t *testing.T) {
			put(c.key, c.val, false)
			defer put(c.key, "", true)
			cfg := e.cfg
			cfg.Log = testLog(t)
			s, err := reflinkstore.New(testCtx(t), cfg)
			if err != nil {
				t.Fatal(err)
			}
			e.stale = append(e.stale, s)
			_, err = s.Load(testCtx(t))
			reflinkstore.StopSpareWorker(s)
			if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), c.key) || !strings.Contains(err.Error(), reflinkstore.RecordFile(e.root)) {
				t.Fatalf("Load with the record %s = %s: %v; want an error naming the record, its file, and %q", c.key, c.val, err, c.want)
			}
		})
	}
	e.open(t)
	e.finish(t)
}
