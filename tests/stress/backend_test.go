package stress

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/reflinkstore"
	"github.com/zgolden/zgolden/tests/harness"
	"github.com/zgolden/zgolden/xfsutil"
	"github.com/zgolden/zgolden/zfsstore"
)

// pluginName is the one legacy plugin name this package registers (see harness.Plugin).
const pluginName = "zgolden-stress"

// backend is this machine's real storage for one test: a fresh dataset under the guest's pool,
// or a fresh reflink store root on the host's disk.
type backend struct {
	kind   string // "zfs" or "reflink"
	parent string // ZFS parent dataset
	root   string // reflink store root, symlinks resolved
	work   string // import work directory
}

func newBackend(t *testing.T) *backend {
	t.Helper()
	harness.RequireRoot(t)
	harness.RequireTools(t, "mkfs.xfs", "losetup", "mount", "umount")
	base, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	// Registered after TempDir, so it runs before TempDir's removal: never delete through a mount.
	t.Cleanup(func() { forceClean(t, base) })
	b := &backend{work: filepath.Join(base, "work")}
	if os.Getenv("ZGOLDEN_TEST_ZPOOL") != "" {
		b.kind, b.parent = "zfs", harness.ZFSParent(t)
		return b
	}
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		t.Skip("skipped: /dev/loop-control is missing: this host has no loop devices")
	}
	b.kind, b.root = "reflink", filepath.Join(base, "root")
	return b
}

// forceClean unmounts whatever a failed test left under base and detaches loop devices backed by
// files there, so TempDir's removal never deletes through a mount. A passing test leaves nothing.
func forceClean(t *testing.T, base string) {
	ctx := context.Background()
	for pass := 0; pass < 4; pass++ {
		mounts, _ := xfsutil.MountsUnder(base)
		if len(mounts) == 0 {
			break
		}
		sort.Slice(mounts, func(i, j int) bool { return len(mounts[i].Mountpoint) > len(mounts[j].Mountpoint) })
		for _, m := range mounts {
			_ = xfsutil.Unmount(ctx, m.Mountpoint)
		}
	}
	loops, _ := xfsutil.Loops()
	for _, l := range loops {
		if strings.HasPrefix(l.BackingFile, base+"/") {
			_, _ = xfsutil.DetachLoop(l.Device, l.BackingFile)
		}
	}
}

// open opens the store, as a (re)starting plugin does.
func (b *backend) open(t *testing.T, log *logrus.Entry) driver.Backend {
	t.Helper()
	ctx := context.Background()
	if b.kind == "zfs" {
		s, err := zfsstore.New(ctx, zfsstore.Config{Parent: b.parent, DefaultSize: 1 << 30, WorkDir: b.work, Discard: true, Log: log})
		if err != nil {
			t.Fatalf("zfsstore.New: %v", err)
		}
		return s
	}
	s, err := reflinkstore.New(ctx, reflinkstore.Config{
		Root: b.root, StoreSize: 8 << 30, DefaultSize: 1 << 30, Discard: true, WorkDir: b.work, Log: log,
	})
	if err != nil {
		t.Fatalf("reflinkstore.New: %v", err)
	}
	return s
}

// pluginArgs are the `zgolden serve` flags for this backend.
func (b *backend) pluginArgs() []string {
	if b.kind == "zfs" {
		return []string{"--backend", "zfs", "--parent", b.parent, "--default-size", "1G"}
	}
	return []string{"--backend", "reflink", "--root", b.root, "--store-size", "8G", "--default-size", "1G"}
}

// inventory lists every object the backend holds but its warm spares: datasets and snapshots
// under the parent, or image files and directories in the store plus the loop devices attached to
// them. The spare worker makes and retires spares on its own (harness.WithoutSpares); finish
// checks that none is left once every golden is gone.
func (b *backend) inventory(t *testing.T) []string {
	t.Helper()
	return harness.WithoutSpares(b.inventoryAll(t), b.where())
}

// inventoryAll is inventory with the spares.
func (b *backend) inventoryAll(t *testing.T) []string {
	t.Helper()
	if b.kind == "zfs" {
		return harness.ZFSInventory(t, b.parent)
	}
	return harness.ReflinkInventory(t, filepath.Join(b.root, "store"), "volumes", "goldens")
}

// where is the parent dataset or the store directory, as harness.WithoutSpares takes it.
func (b *backend) where() string {
	if b.kind == "zfs" {
		return b.parent
	}
	return filepath.Join(b.root, "store")
}

// vol is one volume as a client reports it.
type vol struct {
	name   string
	mounts int
}

// expected is what the inventory must hold given the listed volumes and goldens.
func (b *backend) expected(t *testing.T, vols []vol, gs []driver.Golden) []string {
	var out []string
	if b.kind == "zfs" {
		out = append(out, b.parent+"/vol", b.parent+"/golden")
		for _, v := range vols {
			out = append(out, b.parent+"/vol/"+v.name)
		}
		for _, g := range gs {
			out = append(out, b.parent+"/golden/"+g.Project)
			for _, gen := range g.Generations {
				lineage, _, _ := strings.Cut(gen.Source, "@")
				out = append(out, lineage, gen.Source)
			}
		}
	} else {
		store := filepath.Join(b.root, "store")
		kept := harness.ReflinkKept(t, store)
		out = append(out, "volumes", "goldens")
		for _, v := range vols {
			out = append(out, "volumes/"+v.name+".img")
			if v.mounts > 0 || kept[filepath.Join(store, "volumes", v.name+".img")] {
				out = append(out, "loop:"+filepath.Join(store, "volumes", v.name+".img"))
			}
		}
		for _, g := range gs {
			out = append(out, "goldens/"+g.Project)
			for _, gen := range g.Generations {
				rel, _ := filepath.Rel(store, gen.Source)
				out = append(out, rel)
			}
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
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

// client is the API the workload drives, in-process or over the plugin's sockets. Errors keep
// the driver's classification: errKind maps them to what the workload may expect.
type client interface {
	Create(name string, opts map[string]string) error
	Remove(name string) error
	Mount(name, id string) (string, error)
	Unmount(name, id string) error
	Get(name string) (vol, error)
	List() ([]vol, error)
	Path(name string) (string, error)
	Promote(name, project string) error
	Reclaim(project string) error
	Goldens() ([]driver.Golden, error)
	RemoveGolden(project string) error
}

// errKind classifies an error by the driver's sentinels, by value in-process and by message
// over the sockets (the plugin protocol carries only the text).
func errKind(err error) string {
	for _, k := range []struct {
		err  error
		kind string
	}{
		{driver.ErrNotFound, "notfound"}, {driver.ErrExists, "exists"}, {driver.ErrBusy, "busy"},
		{driver.ErrGenerationInUse, "inuse"}, {driver.ErrHasDependents, "dependents"},
	} {
		if errors.Is(err, k.err) || err != nil && strings.Contains(err.Error(), ": "+k.err.Error()) {
			return k.kind
		}
	}
	if err == nil {
		return ""
	}
	return "other"
}

// driverClient calls the driver in-process, so -race sees the driver and the store.
type driverClient struct {
	d *driver.Driver
}

func ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 3*time.Minute)
}

func (c driverClient) Create(name string, opts map[string]string) error {
	cx, cancel := ctx()
	defer cancel()
	return c.d.Create(cx, name, opts)
}

func (c driverClient) Remove(name string) error {
	cx, cancel := ctx()
	defer cancel()
	return c.d.Remove(cx, name)
}

func (c driverClient) Mount(name, id string) (string, error) {
	cx, cancel := ctx()
	defer cancel()
	return c.d.Mount(cx, name, id)
}

func (c driverClient) Unmount(name, id string) error {
	cx, cancel := ctx()
	defer cancel()
	return c.d.Unmount(cx, name, id)
}

func (c driverClient) Get(name string) (vol, error) {
	cx, cancel := ctx()
	defer cancel()
	in, err := c.d.Get(cx, name)
	return vol{name: in.Name, mounts: in.Mounts}, err
}

func (c driverClient) List() ([]vol, error) {
	var out []vol
	for _, in := range c.d.List() {
		out = append(out, vol{name: in.Name, mounts: in.Mounts})
	}
	return out, nil
}

func (c driverClient) Path(name string) (string, error) { return c.d.Path(name) }

func (c driverClient) Promote(name, project string) error {
	cx, cancel := ctx()
	defer cancel()
	_, err := c.d.Promote(cx, name, project)
	return err
}

func (c driverClient) Reclaim(project string) error {
	cx, cancel := ctx()
	defer cancel()
	_, err := c.d.Reclaim(cx, project, 1)
	return err
}

func (c driverClient) Goldens() ([]driver.Golden, error) {
	cx, cancel := ctx()
	defer cancel()
	return c.d.Goldens(cx)
}

func (c driverClient) RemoveGolden(project string) error {
	cx, cancel := ctx()
	defer cancel()
	return c.d.RemoveGolden(cx, project, true)
}

// socketClient speaks to the running plugin as Docker does (POST /VolumeDriver.* with JSON on
// the plugin socket) and as the zgolden command line does (the admin socket's HTTP API).
type socketClient struct {
	plugin, admin *http.Client
}

func unixClient(path string) *http.Client {
	return &http.Client{Timeout: 3 * time.Minute, Transport: &http.Transport{
		MaxIdleConnsPerHost: 32,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", path)
		},
	}}
}

func newSocketClient(p *harness.Plugin) socketClient {
	return socketClient{plugin: unixClient(p.Socket), admin: unixClient(p.AdminSocket)}
}

func (c socketClient) call(method string, req, resp any) error {
	body, err := json.Marshal(req)
	if err != nil {
		return err
	}
	r, err := c.plugin.Post("http://plugin/VolumeDriver."+method, "application/vnd.docker.plugins.v1.2+json", bytes.NewReader(body))
	if err != nil {
		return err
	}
	defer r.Body.Close()
	data, err := io.ReadAll(r.Body)
	if err != nil {
		return err
	}
	var e struct{ Err string }
	if json.Unmarshal(data, &e) == nil && e.Err != "" {
		return errors.New(e.Err)
	}
	if r.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: HTTP %d: %s", method, r.StatusCode, data)
	}
	if resp != nil {
		return json.Unmarshal(data, resp)
	}
	return nil
}

func (c socketClient) adminCall(method, path string, req, resp any) error {
	var body io.Reader
	if req != nil {
		data, err := json.Marshal(req)
		if err != nil {
			return err
		}
		body = bytes.NewReader(data)
	}
	hr, err := http.NewRequest(method, "http://zgolden"+path, body)
	if err != nil {
		return err
	}
	r, err := c.admin.Do(hr)
	if err != nil {
		return err
	}
	defer r.Body.Close()
	data, err := io.ReadAll(r.Body)
	if err != nil {
		return err
	}
	if r.StatusCode >= 300 {
		var e struct{ Error string }
		if json.Unmarshal(data, &e) == nil && e.Error != "" {
			return errors.New(e.Error)
		}
		return fmt.Errorf("%s %s: HTTP %d: %s", method, path, r.StatusCode, data)
	}
	if resp != nil {
		return json.Unmarshal(data, resp)
	}
	return nil
}

func (c socketClient) Create(name string, opts map[string]string) error {
	return c.call("Create", map[string]any{"Name": name, "Opts": opts}, nil)
}

func (c socketClient) Remove(name string) error {
	return c.call("Remove", map[string]string{"Name": name}, nil)
}

func (c socketClient) Mount(name, id string) (string, error) {
	var r struct{ Mountpoint string }
	err := c.call("Mount", map[string]string{"Name": name, "ID": id}, &r)
	return r.Mountpoint, err
}

func (c socketClient) Unmount(name, id string) error {
	return c.call("Unmount", map[string]string{"Name": name, "ID": id}, nil)
}

type wireVolume struct {
	Name       string
	Mountpoint string
	Status     map[string]any
}

func (c socketClient) Get(name string) (vol, error) {
	var r struct{ Volume wireVolume }
	if err := c.call("Get", map[string]string{"Name": name}, &r); err != nil {
		return vol{}, err
	}
	n, _ := r.Volume.Status["mounts"].(float64)
	return vol{name: r.Volume.Name, mounts: int(n)}, nil
}

// List reports names only (Docker's List carries no status); mounts come from Get.
func (c socketClient) List() ([]vol, error) {
	var r struct{ Volumes []wireVolume }
	if err := c.call("List", struct{}{}, &r); err != nil {
		return nil, err
	}
	out := make([]vol, 0, len(r.Volumes))
	for _, v := range r.Volumes {
		m := 0
		if v.Mountpoint != "" {
			m = -1 // mounted, count unknown until Get
		}
		out = append(out, vol{name: v.Name, mounts: m})
	}
	return out, nil
}

func (c socketClient) Path(name string) (string, error) {
	var r struct{ Mountpoint string }
	err := c.call("Path", map[string]string{"Name": name}, &r)
	return r.Mountpoint, err
}

func (c socketClient) Promote(name, project string) error {
	return c.adminCall("POST", "/v1/promote", map[string]string{"volume": name, "project": project}, nil)
}

func (c socketClient) Reclaim(project string) error {
	return c.adminCall("POST", "/v1/reclaim", map[string]any{"project": project, "keep": 1}, nil)
}

func (c socketClient) Goldens() ([]driver.Golden, error) {
	var gs []driver.Golden
	err := c.adminCall("GET", "/v1/goldens", nil, &gs)
	return gs, err
}

func (c socketClient) RemoveGolden(project string) error {
	return c.adminCall("DELETE", "/v1/goldens/"+project+"?force=true", nil, nil)
}
