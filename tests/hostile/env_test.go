package hostile

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/tests/harness"
)

// pluginName is the one legacy plugin name this package registers with Docker (see harness.Plugin).
const pluginName = "zgolden-hostile"

// tried counts every hostile input sent in this package, for the report TestMain prints.
var tried atomic.Int64

// env is the plugin on this machine's real backend, with canaries planted next to its parent
// dataset or store root.
type env struct {
	p       *harness.Plugin
	backend string // "zfs" or "reflink"
	id      string
	bin     string
	parent  string // ZFS parent dataset
	pool    string
	root    string // reflink store root, symlinks resolved
	base    string // reflink: the directory holding the root and the canaries
}

type envOpts struct {
	storeSize string // reflink --store-size (default 8G)
	parent    string // ZFS parent to use instead of a fresh one in the test pool
	extra     []string
	docker    bool // the test drives the docker CLI too
}

func startEnv(t *testing.T, o envOpts) *env {
	t.Helper()
	if o.docker {
		harness.Docker(t)
	}
	harness.RequireRoot(t)
	e := &env{id: harness.ID(), bin: harness.Binary(t)}
	if os.Getenv("ZGOLDEN_TEST_ZPOOL") != "" {
		e.backend, e.pool = "zfs", harness.RequireZFS(t)
		e.parent = o.parent
		if e.parent == "" {
			e.parent = harness.ZFSParent(t)
		} else {
			e.pool, _, _ = strings.Cut(o.parent, "/")
		}
		args := append([]string{"--backend", "zfs", "--parent", e.parent, "--default-size", "1G"}, o.extra...)
		e.p = harness.StartPlugin(t, pluginName, args...)
		return e
	}
	base, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	e.backend, e.base, e.root = "reflink", base, filepath.Join(base, "root")
	// The store file stays mounted when the plugin stops; unmount it after the plugin has
	// stopped, which cleanups registered earlier do.
	t.Cleanup(func() { harness.UnmountReflinkStore(t, e.root) })
	size := o.storeSize
	if size == "" {
		size = "8G"
	}
	args := append([]string{"--backend", "reflink", "--root", e.root, "--store-size", size, "--default-size", "1G"}, o.extra...)
	e.p = harness.StartPlugin(t, pluginName, args...)
	return e
}

// name makes a volume name unique to this env: Docker remembers names per driver.
func (e *env) name(s string) string { return "zh" + e.id + "-" + s }

func (e *env) admin(args ...string) (string, error) {
	return harness.Output(e.bin, append(args, "--admin-socket", e.p.AdminSocket)...)
}

// --- raw requests, as Docker sends them -------------------------------------------------------

func unixClient(path string) *http.Client {
	return &http.Client{Timeout: 3 * time.Minute, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", path)
		},
	}}
}

// raw sends body as-is to the plugin socket and returns the status and the reply.
func (e *env) raw(method, path string, body []byte) (int, string, error) {
	req, err := http.NewRequest(method, "http://plugin"+path, bytes.NewReader(body))
	if err != nil {
		return 0, "", err
	}
	req.Header.Set("Content-Type", "application/vnd.docker.plugins.v1.2+json")
	r, err := unixClient(e.p.Socket).Do(req)
	if err != nil {
		return 0, "", err
	}
	defer r.Body.Close()
	data, err := io.ReadAll(r.Body)
	return r.StatusCode, string(data), err
}

// call sends one well-formed Docker volume plugin request; a reply's Err is an error.
func (e *env) call(method string, req, resp any) error {
	body, err := json.Marshal(req)
	if err != nil {
		return err
	}
	status, data, err := e.raw("POST", "/VolumeDriver."+method, body)
	if err != nil {
		return err
	}
	var r struct{ Err string }
	if json.Unmarshal([]byte(data), &r) == nil && r.Err != "" {
		return errors.New(r.Err)
	}
	if status != http.StatusOK {
		return fmt.Errorf("%s: HTTP %d: %s", method, status, data)
	}
	if resp != nil {
		return json.Unmarshal([]byte(data), resp)
	}
	return nil
}

func (e *env) list(t *testing.T) []string {
	t.Helper()
	var r struct{ Volumes []struct{ Name string } }
	if err := e.call("List", struct{}{}, &r); err != nil {
		t.Fatalf("VolumeDriver.List: %v", err)
	}
	var out []string
	for _, v := range r.Volumes {
		out = append(out, v.Name)
	}
	slices.Sort(out)
	return out
}

func (e *env) mount(name, id string) (string, error) {
	var r struct{ Mountpoint string }
	err := e.call("Mount", map[string]string{"Name": name, "ID": id}, &r)
	return r.Mountpoint, err
}

func (e *env) unmount(name, id string) error {
	return e.call("Unmount", map[string]string{"Name": name, "ID": id}, nil)
}

func (e *env) create(name string, opts map[string]string) error {
	return e.call("Create", map[string]any{"Name": name, "Opts": opts}, nil)
}

func (e *env) remove(name string) error {
	return e.call("Remove", map[string]string{"Name": name}, nil)
}

// stillServing proves the plugin survived: its process answers, and a valid volume can be
// created, mounted, written, unmounted and removed.
func (e *env) stillServing(t *testing.T, after string) {
	t.Helper()
	name := e.name("alive")
	if err := e.create(name, nil); err != nil {
		t.Fatalf("after %s, a valid create fails: %v", after, err)
	}
	mp, err := e.mount(name, "alive")
	if err != nil {
		t.Fatalf("after %s, a valid mount fails: %v", after, err)
	}
	if err := os.WriteFile(filepath.Join(mp, "f"), []byte("alive"), 0o644); err != nil {
		t.Fatalf("after %s, the volume takes no write: %v", after, err)
	}
	if err := e.unmount(name, "alive"); err != nil {
		t.Fatalf("after %s, unmount fails: %v", after, err)
	}
	if err := e.remove(name); err != nil {
		t.Fatalf("after %s, a valid remove fails: %v", after, err)
	}
}

// --- what the backend holds, and what lies outside it ----------------------------------------

// inventory lists everything the backend holds but its warm spares: datasets and snapshots under
// the parent, or the store's files and directories and the loop devices attached to them. The
// spare worker makes and retires spares on its own (harness.WithoutSpares); a hostile request
// that reached one would change what the Creates of the suite get, which they check.
func (e *env) inventory(t *testing.T) []string {
	t.Helper()
	if e.backend == "zfs" {
		return harness.WithoutSpares(harness.ZFSInventory(t, e.parent), e.parent)
	}
	store := filepath.Join(e.root, "store")
	return harness.WithoutSpares(harness.ReflinkInventory(t, store), store)
}

// plantCanaries puts things next to the parent dataset or store root that zgolden must never
// touch (a sibling whose name extends the parent's, with children named like zgolden's own),
// and returns a snapshot function of everything outside the parent or root. Comparing two
// snapshots proves nothing outside was created, changed or removed.
func (e *env) plantCanaries(t *testing.T) func(t *testing.T) []string {
	t.Helper()
	if e.backend == "zfs" {
		canary := e.parent + "-canary"
		harness.Run(t, "zfs", "create", "-p", "-o", "mountpoint=none", canary+"/vol/victim")
		harness.Run(t, "zfs", "create", "-o", "mountpoint=none", canary+"/golden")
		harness.Run(t, "zfs", "snapshot", "-r", canary+"@keep")
		t.Cleanup(func() { _, _ = harness.Output("zfs", "destroy", "-r", canary) })
		return func(t *testing.T) []string {
			t.Helper()
			out := harness.Run(t, "zfs", "list", "-H", "-p", "-r", "-t", "all", "-o", "name,guid,type,mountpoint,canmount,dedup,compression,volsize", e.pool)
			props := harness.Run(t, "zfs", "get", "-H", "-o", "name,property,value", "mountpoint,canmount,dedup,compression,zgolden:owner", e.pool, canary)
			var keep []string
			for _, l := range strings.Split(out+props, "\n") {
				n, _, _ := strings.Cut(l, "\t")
				if n == e.parent || strings.HasPrefix(n, e.parent+"/") || strings.HasPrefix(n, e.parent+"@") {
					continue // inside: the inventory covers it
				}
				keep = append(keep, l)
			}
			slices.Sort(keep)
			return keep
		}
	}
	for path, content := range map[string]string{
		filepath.Join(e.base, "root-canary", "volumes", "victim.img"):         "precious image",
		filepath.Join(e.base, "root-canary", "goldens", "victim", "gen1.img"): "precious golden",
		filepath.Join(e.base, "canary.img"):                                   "precious file",
		filepath.Join(filepath.Dir(e.base), "zgolden-canary"):                 "outside the test dir",
	} {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return func(t *testing.T) []string {
		t.Helper()
		var out []string
		walk := func(dir string, skip string, depth int) {
			_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
				if err != nil {
					return nil
				}
				if p == skip {
					return filepath.SkipDir // inside the root: the inventory covers it
				}
				if rel, _ := filepath.Rel(dir, p); d.IsDir() && strings.Count(rel, "/") >= depth {
					return filepath.SkipDir
				}
				fi, err := d.Info()
				if err != nil {
					return nil
				}
				sum := ""
				if fi.Mode().IsRegular() {
					data, _ := os.ReadFile(p)
					h := sha256.Sum256(data)
					sum = hex.EncodeToString(h[:8])
				}
				out = append(out, fmt.Sprintf("%s %s %d %s %s", p, fi.Mode(), fi.Size(), fi.ModTime().UTC().Format(time.RFC3339Nano), sum))
				return nil
			})
		}
		walk(e.base, e.root, 8)
		out = append(out, "root entries: "+strings.Join(topEntries(e.root), ","))
		if fi, err := os.Stat(filepath.Join(filepath.Dir(e.base), "zgolden-canary")); err == nil {
			out = append(out, fmt.Sprintf("sibling canary %d %s", fi.Size(), fi.ModTime().UTC().Format(time.RFC3339Nano)))
		}
		slices.Sort(out)
		return out
	}
}

func topEntries(dir string) []string {
	es, _ := os.ReadDir(dir)
	var out []string
	for _, e := range es {
		out = append(out, e.Name())
	}
	return out
}

func diff(before, after []string) string {
	return fmt.Sprintf("gone: %v; new: %v", minus(before, after), minus(after, before))
}

func minus(a, b []string) []string {
	var out []string
	for _, s := range a {
		if !slices.Contains(b, s) {
			out = append(out, s)
		}
	}
	return out
}

func mountsUnder(t *testing.T, dir string) []string {
	t.Helper()
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, m := range ms {
		out = append(out, m.Mountpoint)
	}
	return out
}

func (e *env) goldens(t *testing.T) []driver.Golden {
	t.Helper()
	out, err := e.admin("golden", "ls", "--json")
	if err != nil {
		t.Fatalf("zgolden golden ls: %v\n%s", err, out)
	}
	var gs []driver.Golden
	if err := json.Unmarshal([]byte(out), &gs); err != nil {
		t.Fatalf("golden ls --json: %v\n%s", err, out)
	}
	return gs
}

// clearError checks that a rejection is one a person can act on: it names the problem (want),
// is of a readable length, and carries no raw control characters (a hostile name must not be
// able to paint a terminal or forge log lines).
func clearError(msg, want string) error {
	switch {
	case want != "" && !strings.Contains(msg, want):
		return fmt.Errorf("the error does not say %q", want)
	case len(msg) > 8<<10:
		return fmt.Errorf("the error is %d bytes long", len(msg))
	}
	for _, r := range msg {
		if r < 0x20 && r != '\n' || r == 0x7f {
			return fmt.Errorf("the error carries the raw control character %q", r)
		}
	}
	return nil
}
