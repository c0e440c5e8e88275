package zfsstore_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/sirupsen/logrus"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/driver/drivertest"
	"github.com/zgolden/zgolden/tests/harness"
	"github.com/zgolden/zgolden/xfsutil"
	"github.com/zgolden/zgolden/zfsstore"
)

// host is one zgolden host of a two-host fleet, in one guest: its own pool, parent, store,
// mount root and state.
type host struct {
	parent, work, state string
	store               *zfsstore.Store
	d                   *driver.Driver
	mounts              string
}

func newHost(t *testing.T, parent string) *host {
	t.Helper()
	h := &host{parent: parent, work: t.TempDir(), state: t.TempDir(), mounts: t.TempDir()}
	h.open(t)
	// Before the store's Close and the pool's destroy (cleanups run last in, first out): a
	// session left mounted by a failed test would keep both busy.
	t.Cleanup(func() {
		if mounts, err := xfsutil.MountsUnder(h.mounts); err == nil {
			for i := len(mounts) - 1; i >= 0; i-- {
				_, _ = harness.Output("umount", mounts[i].Mountpoint)
			}
		}
	})
	return h
}

func (h *host) open(t *testing.T) {
	t.Helper()
	h.store = mustOpen(t, h.parent, h.work)
	l := logrus.New()
	l.SetLevel(logrus.WarnLevel)
	d, err := driver.New(context.Background(), driver.Config{Backend: h.store, MountRoot: h.mounts, StateDir: h.state, DefaultSize: 1 << 30, Log: logrus.NewEntry(l)})
	if err != nil {
		t.Fatal(err)
	}
	h.d = d
}

// restart closes the host's store and opens it again, as a restart of zgolden serve does.
func (h *host) restart(t *testing.T) {
	t.Helper()
	if err := h.store.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	h.open(t)
}

// secondPool makes a pool on a sparse file, as a second host's own disk, and its parent dataset.
func secondPool(t *testing.T) string {
	t.Helper()
	harness.RequireZFS(t)
	pool := "zgt" + harness.ID()
	img := filepath.Join(os.TempDir(), pool+".img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 4<<30); err != nil {
		t.Fatal(err)
	}
	harness.Run(t, "zpool", "create", "-o", "ashift=12", pool, img)
	t.Cleanup(func() {
		if out, err := harness.Output("zpool", "destroy", "-f", pool); err != nil {
			t.Errorf("cleanup: zpool destroy %s: %v\n%s", pool, err, out)
		}
		os.Remove(img)
	})
	return pool + "/zg"
}

func (h *host) export(t *testing.T, project string, n, since int) []byte {
	t.Helper()
	var buf bytes.Buffer
	if _, err := h.d.Export(context.Background(), project, n, since, &buf); err != nil {
		t.Fatalf("export %s generation %d since %d: %v", project, n, since, err)
	}
	return buf.Bytes()
}

func (h *host) newest(t *testing.T, project string) driver.Generation {
	t.Helper()
	gs, err := h.d.Goldens(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range gs {
		if g.Project == project && g.Newest() != nil {
			return *g.Newest()
		}
	}
	t.Fatalf("golden %q has no generation", project)
	return driver.Generation{}
}

// promoteWith makes a volume from project's newest generation, writes a marker into it and
// promotes it: the next generation, on the same lineage after the re-root.
func (h *host) promoteWith(t *testing.T, project, vol, marker string) driver.Generation {
	t.Helper()
	ctx := context.Background()
	if err := h.d.Create(ctx, vol, map[string]string{"golden": project}); err != nil {
		t.Fatal(err)
	}
	mp, err := h.d.Mount(ctx, vol, "promote")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(mp, "marker"), []byte(marker), 0o644); err != nil {
		t.Fatal(err)
	}
	g, err := h.d.Promote(ctx, vol, project)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.d.Unmount(ctx, vol, "promote"); err != nil {
		t.Fatal(err)
	}
	return g
}

// readMarker mounts a new volume of project's generation n and returns its marker file.
func (h *host) readMarker(t *testing.T, project string, n int, vol string) string {
	t.Helper()
	ctx := context.Background()
	opts := map[string]string{"golden": project}
	if n > 0 {
		opts["generation"] = strconv.Itoa(n)
	}
	if err := h.d.Create(ctx, vol, opts); err != nil {
		t.Fatalf("create %s from %s generation %d: %v", vol, project, n, err)
	}
	mp, err := h.d.Mount(ctx, vol, "read")
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(mp, "marker"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	if err := h.d.Unmount(ctx, vol, "read"); err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// twoHosts makes host a on the test pool and host b on a pool of its own, and imports the tree
// it returns into a as golden prj.
func twoHosts(t *testing.T) (a, b *host, src string) {
	t.Helper()
	a, b = newHost(t, harness.ZFSParent(t)), newHost(t, secondPool(t))
	src = t.TempDir()
	drivertest.MakeTree(t, src)
	if _, err := a.d.Import(context.Background(), "prj", driver.KindBlock, src, driver.ImportOptions{}, nil); err != nil {
		t.Fatal(err)
	}
	return a, b, src
}

// TestTransferBetweenHosts: a golden moves from one host's pool to another's as streams, in full
// and then incrementally after a promotion, while the receiver has a session of the older
// generation mounted; every bad stream is refused with nothing of it left.
func TestTransferBetweenHosts(t *testing.T) {
	a, b, src := twoHosts(t)
	ctx := context.Background()
	g2 := a.promoteWith(t, "prj", "a-first", "two")

	full := a.export(t, "prj", 0, 0)
	got, err := b.d.Receive(ctx, "prj", bytes.NewReader(full))
	if err != nil || got.Number != g2.Number {
		t.Fatalf("receive in full: %+v, %v; want generation %d", got, err, g2.Number)
	}
	if m := b.readMarker(t, "prj", 0, "b-one"); m != "two" {
		t.Fatalf("the received generation reads marker %q, want %q", m, "two")
	}
	// The same stream again changes nothing.
	if again, err := b.d.Receive(ctx, "prj", bytes.NewReader(full)); err != nil || again.Number != g2.Number {
		t.Fatalf("receiving the same stream again: %+v, %v", again, err)
	}
	// A session of the older generation stays mounted on the receiver through what follows.
	if err := b.d.Create(ctx, "b-session", map[string]string{"golden": "prj"}); err != nil {
		t.Fatal(err)
	}
	sessionMP, err := b.d.Mount(ctx, "b-session", "session")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(sessionMP, "mine"), []byte("kept"), 0o644); err != nil {
		t.Fatal(err)
	}

	g3 := a.promoteWith(t, "prj", "a-second", "three")
	inc := a.export(t, "prj", 0, g2.Number)
	if len(inc) >= len(full) {
		t.Errorf("the incremental stream (%d bytes) is not smaller than the full one (%d)", len(inc), len(full))
	}
	t.Logf("full stream %d bytes, incremental %d bytes", len(full), len(inc))
	if got, err := b.d.Receive(ctx, "prj", bytes.NewReader(inc)); err != nil || got.Number != g3.Number {
		t.Fatalf("receive incrementally: %+v, %v; want generation %d", got, err, g3.Number)
	}
	if m := b.readMarker(t, "prj", 0, "b-three"); m != "three" {
		t.Fatalf("the incremental generation reads marker %q, want %q", m, "three")
	}
	if m := b.readMarker(t, "prj", g2.Number, "b-two"); m != "two" {
		t.Fatalf("the older generation reads marker %q after the incremental receive, want %q", m, "two")
	}
	if data, err := os.ReadFile(filepath.Join(sessionMP, "mine")); err != nil || string(data) != "kept" {
		t.Fatalf("the mounted session lost its data: %q, %v", data, err)
	}
	if st := harness.ZFSInventory(t, b.parent); !slices.Contains(st, b.parent+"/vol/b-session") {
		t.Fatalf("the receiver's session is gone: %v", st)
	}

	t.Run("bad streams", func(t *testing.T) {
		g4 := a.promoteWith(t, "prj", "a-third", "four")
		next := a.export(t, "prj", 0, g3.Number)
		// A stream cut short leaves a partial receive of generation 4 for its resume
		// (TestTransferResumes); it is no generation, and every other check ignores it.
		partialDS := "/prj/g" + strconv.Itoa(g4.Number)
		inventory := func() []string {
			return slices.DeleteFunc(harness.ZFSInventory(t, b.parent), func(n string) bool { return strings.HasSuffix(n, partialDS) })
		}
		before := inventory()
		refuse := func(what, project string, stream []byte, want error, says string) {
			t.Helper()
			_, err := b.d.Receive(ctx, project, bytes.NewReader(stream))
			if !errors.Is(err, want) || !strings.Contains(err.Error(), says) {
				t.Errorf("%s: %v; want an error wrapping %v that says %q", what, err, want, says)
			} else {
				t.Logf("%s: %v", what, err)
			}
			if after := inventory(); !slices.Equal(after, before) {
				t.Errorf("%s left %v (before: %v)", what, after, before)
			}
		}
		refuse("a truncated stream", "prj", next[:len(next)/2], driver.ErrInvalid, "resumes it")
		if p := partialOf(t, b, "prj"); p == nil || p.Generation != g4.Number {
			t.Errorf("a truncated stream kept %+v; want the partial receive of generation %d", p, g4.Number)
		}
		corrupt := append([]byte{}, next...)
		for i := len(corrupt) / 2; i < len(corrupt)/2+4096 && i < len(corrupt); i++ {
			corrupt[i] ^= 0x5a
		}
		refuse("a corrupt stream", "prj", corrupt, driver.ErrInvalid, "")
		refuse("a stream for another project", "other", next, driver.ErrInvalid, `carries golden "prj"`)
		refuse("not a stream at all", "prj", []byte("hello\n"), driver.ErrInvalid, "not a zgolden golden stream")
		refuse("an empty stream", "prj", nil, driver.ErrInvalid, "empty")
		// Incremental from a generation the receiver lacks.
		refuse("a missing base", "prj", a.export(t, "prj", 0, 1), driver.ErrNotFound, "send it in full")
		// A diverged history: the receiver's generation 3 is its own.
		c := newHost(t, harness.ZFSParent(t))
		if _, err := c.d.Import(ctx, "prj", driver.KindBlock, src, driver.ImportOptions{}, nil); err != nil {
			t.Fatal(err)
		}
		c.promoteWith(t, "prj", "c-1", "c2")
		c.promoteWith(t, "prj", "c-2", "c3")
		_, err := c.d.Receive(ctx, "prj", bytes.NewReader(next))
		if !errors.Is(err, driver.ErrGenerationInUse) || !strings.Contains(err.Error(), "diverged") {
			t.Errorf("a diverged receiver: %v; want a refusal that says the histories diverged", err)
		}
		// A replication stream (zfs send -R) of the sender's lineage under a header that names
		// its newest generation truly: it would bring every snapshot of the lineage.
		lineageSnap := a.newest(t, "prj").Source
		guid := strings.TrimSpace(harness.Run(t, "zfs", "get", "-H", "-o", "value", "guid", lineageSnap))
		header := `{"format":"zgolden-golden-stream/1","backend":"zfs","project":"prj","kind":"block","generation":` +
			strconv.Itoa(g4.Number) + `,"guid":"` + guid + `"}` + "\n"
		replication, err := exec.Command("zfs", "send", "-R", lineageSnap).Output()
		if err != nil {
			t.Fatal(err)
		}
		refuse("a replication stream", "prj", append([]byte(header), replication...), driver.ErrInvalid, "not zfs send -R")
		// A receiver out of space: a quota on its parent just above what the parent holds.
		used := strings.TrimSpace(harness.Run(t, "zfs", "get", "-H", "-p", "-o", "value", "used", b.parent))
		n, err := strconv.ParseUint(used, 10, 64)
		if err != nil {
			t.Fatalf("zfs get used %s: %q", b.parent, used)
		}
		harness.Run(t, "zfs", "set", "quota="+strconv.FormatUint(n+64<<10, 10), b.parent)
		refuse("a receiver out of space", "prj", next, driver.ErrNoSpace, "nothing of the stream was kept")
		harness.Run(t, "zfs", "set", "quota=none", b.parent)
		// The good stream still goes in after all of that, and no partial receive is left.
		if got, err := b.d.Receive(ctx, "prj", bytes.NewReader(next)); err != nil || got.Number != g4.Number {
			t.Fatalf("the good stream after the bad ones: %+v, %v", got, err)
		}
		if p := partialOf(t, b, "prj"); p != nil {
			t.Errorf("a partial receive is left after the good stream: %+v", p)
		}
	})

	t.Run("two receives into one project", func(t *testing.T) {
		d := newHost(t, harness.ZFSParent(t))
		gate := &gatedReader{r: bytes.NewReader(full), open: make(chan struct{}), started: make(chan struct{})}
		var wg sync.WaitGroup
		wg.Add(1)
		var firstErr error
		go func() { defer wg.Done(); _, firstErr = d.d.Receive(ctx, "prj", gate) }()
		<-gate.started
		_, err := d.d.Receive(ctx, "prj", bytes.NewReader(full))
		close(gate.open)
		wg.Wait()
		if !errors.Is(err, driver.ErrImportRunning) {
			t.Errorf("a second receive while one runs: %v; want ErrImportRunning", err)
		}
		if firstErr != nil {
			t.Errorf("the first receive: %v", firstErr)
		}
	})

	t.Run("reclaim waits for an export", func(t *testing.T) {
		pr, pw := io.Pipe()
		done := make(chan error, 1)
		go func() {
			_, err := a.d.Export(ctx, "prj", g3.Number, 0, pw)
			pw.CloseWithError(err)
			done <- err
		}()
		head := make([]byte, 1)
		if _, err := io.ReadFull(pr, head); err != nil { // the export is under way, its holds placed
			t.Fatal(err)
		}
		for _, v := range []string{"a-first", "a-second", "a-third"} {
			if err := a.d.Remove(ctx, v); err != nil {
				t.Fatal(err)
			}
		}
		removed, err := a.d.Reclaim(ctx, "prj", 1)
		if err != nil {
			t.Fatalf("reclaim during an export: %v", err)
		}
		for _, g := range removed {
			if g.Number == g3.Number {
				t.Errorf("reclaim destroyed generation %d while it was being exported", g3.Number)
			}
		}
		if _, err := io.Copy(io.Discard, pr); err != nil {
			t.Fatal(err)
		}
		if err := <-done; err != nil {
			t.Fatalf("the export: %v", err)
		}
		if removed, err := a.d.Reclaim(ctx, "prj", 1); err != nil || len(removed) == 0 {
			t.Errorf("after the export, reclaim removed %v (%v); want the held generation gone now", removed, err)
		}
	})
}

// gatedReader blocks its first read until open is closed, and says when it started.
type gatedReader struct {
	r       io.Reader
	open    chan struct{}
	started chan struct{}
	once    sync.Once
}

func (g *gatedReader) Read(p []byte) (int, error) {
	g.once.Do(func() { close(g.started) })
	<-g.open
	return g.r.Read(p)
}

// partialOf is the partial receive h keeps for project, from its goldens (nil: none).
func partialOf(t *testing.T, h *host, project string) *driver.PartialReceive {
	t.Helper()
	gs, err := h.d.Goldens(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range gs {
		if g.Project == project {
			return g.Partial
		}
	}
	return nil
}

// TestTransferResumes: a stream cut short leaves a partial receive that no Create can clone and
// that a restart keeps; the sender then sends only the rest, from the receiver's token, in full
// and incrementally. A transfer that does not resume replaces the partial one, a token that no
// longer resumes falls back to the whole stream, and a token is refused for any snapshot but a
// generation of the project it is asked for.
func TestTransferResumes(t *testing.T) {
	a, b, _ := twoHosts(t)
	ctx := context.Background()
	// cut receives the first part of stream on b, and returns the partial receive it kept.
	cut := func(stream []byte, gen int) *driver.PartialReceive {
		t.Helper()
		_, err := b.d.Receive(ctx, "prj", bytes.NewReader(stream[:len(stream)*2/5]))
		if !errors.Is(err, driver.ErrInvalid) || !strings.Contains(err.Error(), "resumes it") {
			t.Fatalf("a stream cut short: %v; want ErrInvalid saying the next transfer resumes it", err)
		}
		p := partialOf(t, b, "prj")
		if p == nil || p.Generation != gen || p.Token == "" {
			t.Fatalf("after a stream cut short, the partial receive is %+v; want one of generation %d with a token", p, gen)
		}
		return p
	}
	// resume has a send the rest from b's token and b receive it.
	resume := func(p *driver.PartialReceive, n, base, whole int) driver.Generation {
		t.Helper()
		var rest bytes.Buffer
		h, err := a.d.ExportResume(ctx, "prj", n, base, p.Token, &rest)
		if err != nil || !h.Resume || h.Generation != p.Generation {
			t.Fatalf("export from the token: %+v, %v; want the rest of generation %d", h, err, p.Generation)
		}
		if rest.Len() >= whole {
			t.Errorf("the resumed stream has %d bytes, not fewer than the whole stream's %d", rest.Len(), whole)
		}
		t.Logf("generation %d: whole stream %d bytes, its rest after the cut %d bytes", p.Generation, whole, rest.Len())
		got, err := b.d.Receive(ctx, "prj", &rest)
		if err != nil || got.Number != p.Generation {
			t.Fatalf("receive the rest: %+v, %v", got, err)
		}
		if q := partialOf(t, b, "prj"); q != nil {
			t.Errorf("a partial receive is left after the resume: %+v", q)
		}
		return got
	}

	full := a.export(t, "prj", 0, 0)
	p := cut(full, 1)
	// A golden with no generation yet makes a cold-start volume unless the Create denies that:
	// either way nothing may come of the partial receive.
	if err := b.d.Create(ctx, "early", map[string]string{"golden": "prj", "cold": "deny"}); err == nil {
		t.Fatal("a Create with cold=deny found a generation in a golden whose only content is a partial receive")
	}
	b.restart(t)
	if q := partialOf(t, b, "prj"); q == nil || q.Token != p.Token {
		t.Fatalf("after a restart the partial receive is %+v; want %+v", q, p)
	}
	resume(p, 0, 0, len(full))
	if err := b.d.Create(ctx, "b-one", map[string]string{"golden": "prj"}); err != nil {
		t.Fatal(err)
	}
	mp, err := b.d.Mount(ctx, "b-one", "check")
	if err != nil {
		t.Fatal(err)
	}
	drivertest.CheckTree(t, mp)
	if err := b.d.Unmount(ctx, "b-one", "check"); err != nil {
		t.Fatal(err)
	}

	// Incrementally: the partial receive is a clone of the base, re-rooted once whole.
	g2 := a.promoteWith(t, "prj", "a-1", "two")
	inc := a.export(t, "prj", 0, 1)
	resume(cut(inc, g2.Number), g2.Number, 1, len(inc))
	if m := b.readMarker(t, "prj", 0, "b-two"); m != "two" {
		t.Fatalf("the resumed incremental generation reads marker %q, want %q", m, "two")
	}
	if m := b.readMarker(t, "prj", 1, "b-one-again"); m != "" {
		t.Fatalf("generation 1 reads marker %q after the resumed receive, want none", m)
	}

	// A transfer that does not resume replaces the partial receive.
	g3 := a.promoteWith(t, "prj", "a-2", "three")
	inc3 := a.export(t, "prj", 0, g2.Number)
	cut(inc3, g3.Number)
	if got, err := b.d.Receive(ctx, "prj", bytes.NewReader(inc3)); err != nil || got.Number != g3.Number {
		t.Fatalf("the whole stream over a partial receive: %+v, %v", got, err)
	}
	if q := partialOf(t, b, "prj"); q != nil {
		t.Errorf("the whole stream left the partial receive %+v", q)
	}

	// A token is no key to the sender's pool.
	g4 := a.promoteWith(t, "prj", "a-3", "four")
	inc4 := a.export(t, "prj", 0, g3.Number)
	p4 := cut(inc4, g4.Number)
	for what, tc := range map[string]struct{ project, token, says string }{
		"another project's name":       {"other", p4.Token, "not a generation of golden \"other\""},
		"a token of another form":      {"prj", "1-abc; reboot", "is not a resume token"},
		"a token that does not decode": {"prj", "1-abc-def-0123", "does not decode"},
	} {
		var w bytes.Buffer
		if _, err := a.d.ExportResume(ctx, tc.project, 0, 0, tc.token, &w); !errors.Is(err, driver.ErrInvalid) || !strings.Contains(err.Error(), tc.says) || w.Len() > 0 {
			t.Errorf("export from %s: %v, %d bytes written; want ErrInvalid saying %q and nothing sent", what, err, w.Len(), tc.says)
		}
	}
	// The generation the token resumes moves with the next promotion's re-root: the sender
	// sends the whole stream of its newest generation instead, and the receiver takes it.
	g5 := a.promoteWith(t, "prj", "a-4", "five")
	var again bytes.Buffer
	h, err := a.d.ExportResume(ctx, "prj", 0, 0, p4.Token, &again)
	if err != nil || h.Resume || h.Generation != g5.Number {
		t.Fatalf("export from a token whose generation moved: %+v, %v; want the whole stream of generation %d", h, err, g5.Number)
	}
	if got, err := b.d.Receive(ctx, "prj", &again); err != nil || got.Number != g5.Number {
		t.Fatalf("receive the fallback stream: %+v, %v", got, err)
	}
	if q := partialOf(t, b, "prj"); q != nil {
		t.Errorf("the fallback stream left the partial receive %+v", q)
	}
	if m := b.readMarker(t, "prj", 0, "b-five"); m != "five" {
		t.Fatalf("generation %d reads marker %q, want %q", g5.Number, m, "five")
	}
	for _, h := range []*host{a, b} {
		for _, v := range h.d.List() {
			if err := h.d.Remove(ctx, v.Name); err != nil {
				t.Error(err)
			}
		}
	}

	// A golden removed while it holds an incremental partial receive (a clone of one of its
	// generations) goes whole, the partial receive with it.
	a.promoteWith(t, "prj", "a-5", "six")
	cut(a.export(t, "prj", 0, g5.Number), g5.Number+1)
	if err := b.d.RemoveGolden(ctx, "prj", false); err != nil {
		t.Fatalf("golden rm of a project with a partial receive: %v", err)
	}
	for _, name := range harness.ZFSInventory(t, b.parent) {
		if strings.Contains(name, "/prj") {
			t.Errorf("after golden rm, %s is left", name)
		}
	}
	if q := partialOf(t, b, "prj"); q != nil {
		t.Errorf("after golden rm the partial receive %+v is still listed", q)
	}
}
