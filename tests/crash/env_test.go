package crash

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/tests/harness"
)

// pluginName is the one legacy plugin name this package registers with Docker (see harness.Plugin).
const pluginName = "zgolden-crash"

// env is the plugin on this machine's real backend: ZFS in the guest, the reflink store on the
// host. Docker remembers volume names per driver, so every name carries the env's random id.
type env struct {
	p        *harness.Plugin
	backend  string // "zfs" or "reflink"
	id       string
	parent   string // ZFS parent dataset
	root     string // reflink store root, symlinks resolved
	stateDir string
	bin      string
}

func startEnv(t *testing.T) *env {
	t.Helper()
	harness.Docker(t)
	e := &env{id: harness.ID(), bin: harness.Binary(t)}
	// Without spares, whatever the default: most scenarios crash a Create inside its clone or
	// reflink, which a Create that claims a spare never reaches. The spare variants turn them
	// on for their own scenario (withSpares: a later --spares wins).
	if os.Getenv("ZGOLDEN_TEST_ZPOOL") != "" {
		e.backend, e.parent = "zfs", harness.ZFSParent(t)
		e.p = harness.StartPlugin(t, pluginName, "--backend", "zfs", "--parent", e.parent, "--default-size", "1G", "--spares", "0")
	} else {
		e.backend = "reflink"
		root, err := filepath.EvalSymlinks(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		e.root = filepath.Join(root, "root")
		// The store file stays mounted when the plugin stops; unmount it after the plugin has
		// stopped, which cleanups registered earlier do.
		t.Cleanup(func() { harness.UnmountReflinkStore(t, e.root) })
		e.p = harness.StartPlugin(t, pluginName, "--backend", "reflink", "--root", e.root, "--store-size", "8G", "--default-size", "1G", "--spares", "0")
	}
	e.stateDir = filepath.Dir(e.p.AdminSocket)
	return e
}

// admin runs the zgolden admin command line against the plugin. Unlike Plugin.Admin it needs no
// *testing.T, so operations that crash the plugin can run it in their own goroutine.
func (e *env) admin(args ...string) (string, error) {
	return harness.Output(e.bin, append(args, "--admin-socket", e.p.AdminSocket)...)
}

// adminStream runs a zgolden admin command with its standard input from the file in and its
// standard output to the file out (either "" for none); it returns standard error.
func (e *env) adminStream(in, out string, args ...string) (string, error) {
	cmd := exec.Command(e.bin, append(args, "--admin-socket", e.p.AdminSocket)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if in != "" {
		f, err := os.Open(in)
		if err != nil {
			return "", err
		}
		defer f.Close()
		cmd.Stdin = f
	}
	if out != "" {
		f, err := os.Create(out)
		if err != nil {
			return "", err
		}
		defer f.Close()
		cmd.Stdout = f
	}
	err := cmd.Run()
	return stderr.String(), err
}

// noHolds checks that no golden snapshot is held (ZFS): an export's holds end with it. The
// reflink store holds an open file instead, which ends with its process.
func (e *env) noHolds(t *testing.T) {
	t.Helper()
	if e.backend != "zfs" {
		return
	}
	out, err := harness.Output("zfs", "list", "-H", "-t", "snapshot", "-o", "name,userrefs", "-r", e.parent+"/golden")
	if err != nil {
		t.Fatalf("zfs list: %v\n%s", err, out)
	}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[1] != "0" {
			t.Errorf("%s is still held (%s user holds) after the export ended", f[0], f[1])
		}
	}
}

// name makes a volume name unique to this env.
func (e *env) name(s string) string { return "zc" + e.id + "-" + s }

// --- the plugin's socket, Docker's API and the admin API -------------------------------------

func unixClient(socket string) *http.Client {
	return &http.Client{Timeout: 3 * time.Minute, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", socket)
		},
	}}
}

// do sends one JSON request over a unix socket and decodes the reply into resp. A reply that
// carries an error (the plugin protocol's Err, the admin API's error, Docker's message) or a
// status of 300 or more is an error.
func do(socket, method, path string, req, resp any) error {
	var body io.Reader
	if req != nil {
		data, err := json.Marshal(req)
		if err != nil {
			return err
		}
		body = bytes.NewReader(data)
	}
	hr, err := http.NewRequest(method, "http://local"+path, body)
	if err != nil {
		return err
	}
	hr.Header.Set("Content-Type", "application/json")
	r, err := unixClient(socket).Do(hr)
	if err != nil {
		return err
	}
	defer r.Body.Close()
	data, err := io.ReadAll(r.Body)
	if err != nil {
		return err
	}
	var e struct {
		Err     string
		Error   string `json:"error"`
		Message string `json:"message"`
	}
	if json.Unmarshal(data, &e) == nil && e.Err+e.Error+e.Message != "" {
		return errors.New(e.Err + e.Error + e.Message)
	}
	if r.StatusCode >= 300 {
		return fmt.Errorf("%s %s: HTTP %d: %s", method, path, r.StatusCode, data)
	}
	if resp != nil && len(data) > 0 {
		return json.Unmarshal(data, resp)
	}
	return nil
}

// call POSTs one Docker volume plugin request, as Docker sends it.
func call(socket, method string, req, resp any) error {
	return do(socket, "POST", "/VolumeDriver."+method, req, resp)
}

// dockerSocket is the engine's API socket. The checks read Docker's view through the API rather
// than the docker command: under emulation each docker process costs a second or two, and the
// operations under test still go through the command line.
const dockerSocket = "/var/run/docker.sock"

type volume struct {
	Name       string
	Mountpoint string // set while a caller holds the volume
	Status     map[string]any
}

func (v volume) mounts() int {
	n, _ := v.Status["mounts"].(float64)
	return int(n)
}

func (v volume) str(k string) string {
	s, _ := v.Status[k].(string)
	return s
}

// volumes is the plugin's List, as Docker sees it (names and mountpoints, no status).
func (e *env) volumes(t *testing.T) []volume {
	t.Helper()
	var ls struct{ Volumes []volume }
	if err := call(e.p.Socket, "List", struct{}{}, &ls); err != nil {
		t.Fatalf("VolumeDriver.List: %v", err)
	}
	return ls.Volumes
}

// get is the plugin's Get of one volume, with its status.
func (e *env) get(name string) (volume, error) {
	var g struct{ Volume volume }
	err := call(e.p.Socket, "Get", map[string]string{"Name": name}, &g)
	return g.Volume, err
}

func (e *env) mount(name, id string) (string, error) {
	var r struct{ Mountpoint string }
	err := call(e.p.Socket, "Mount", map[string]string{"Name": name, "ID": id}, &r)
	return r.Mountpoint, err
}

func (e *env) unmount(name, id string) error {
	return call(e.p.Socket, "Unmount", map[string]string{"Name": name, "ID": id}, nil)
}

// goldens is what zgolden golden ls shows, from the admin API.
func (e *env) goldens(t *testing.T) []driver.Golden {
	t.Helper()
	var gs []driver.Golden
	if err := do(e.p.AdminSocket, "GET", "/v1/goldens", nil, &gs); err != nil {
		t.Fatalf("admin API goldens: %v", err)
	}
	return gs
}

// status is what the suite reads of zgolden status.
type status struct {
	Volumes        int            `json:"volumes"`
	SparesReady    map[string]int `json:"spares_ready"`
	SparesMounted  int            `json:"spares_mounted"`
	ClaimsPending  int            `json:"claims_pending"`
	RemovedPending int            `json:"removed_pending"`
	SparesMaking   int            `json:"spares_making"`
	SettlesPending int            `json:"settles_pending"`
}

func (e *env) status() (status, error) {
	var st status
	err := do(e.p.AdminSocket, "GET", "/v1/status", nil, &st)
	return st, err
}

// settledSpares waits until no claimed spare is still to be renamed, and returns the spares
// under PARENT/spare, which must be as many as zgolden status says are ready: a spare no count
// knows of has leaked. It is empty on the reflink store, and while the plugin runs without
// --spares once its worker has retired the last ones.
func (e *env) settledSpares(t *testing.T) []string {
	t.Helper()
	if e.backend != "zfs" {
		return e.reflinkSpares(t)
	}
	var last string
	for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		st1, err := e.status()
		if err != nil || st1.ClaimsPending > 0 {
			last = fmt.Sprintf("status %+v, %v", st1, err)
			continue
		}
		out := harness.Run(t, "zfs", "list", "-H", "-r", "-t", "volume", "-o", "name", e.parent+"/spare")
		spares := strings.Fields(out)
		st2, err := e.status()
		ready := 0
		for _, n := range st2.SparesReady {
			ready += n
		}
		if err == nil && maps.Equal(st1.SparesReady, st2.SparesReady) && st2.ClaimsPending == 0 && ready == len(spares) {
			return spares
		}
		last = fmt.Sprintf("%d spares under %s/spare, status %+v (%v)", len(spares), e.parent, st2, err)
	}
	t.Errorf("the spares never settled: %s", last)
	return nil
}

// reflinkSpares is settledSpares on the reflink store: the loop devices of the spares' images
// under STORE/spares (reflinkstore/spares.go), as the inventory lists them, once as many as zgolden
// status says are ready. The spare files themselves are outside the inventory's directories.
func (e *env) reflinkSpares(t *testing.T) []string {
	t.Helper()
	prefix := "loop:" + filepath.Join(e.root, "store", "spares") + "/"
	var last string
	for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		st1, err1 := e.status()
		var loops []string
		for _, x := range e.inventory(t) {
			if strings.HasPrefix(x, prefix) {
				loops = append(loops, x)
			}
		}
		st2, err2 := e.status()
		ready := 0
		for _, n := range st2.SparesReady {
			ready += n
		}
		if err1 == nil && err2 == nil && maps.Equal(st1.SparesReady, st2.SparesReady) && ready == len(loops) {
			return loops
		}
		last = fmt.Sprintf("%d spare loop devices, status %+v", len(loops), st2)
	}
	t.Errorf("the spares never settled: %s", last)
	return nil
}

// --- what the backend holds ---------------------------------------------------------------

// inventory lists every object the backend holds: datasets and snapshots under the parent, or
// the store's image files and directories plus the loop devices attached to them.
func (e *env) inventory(t *testing.T) []string {
	t.Helper()
	if e.backend == "zfs" {
		return harness.ZFSInventory(t, e.parent)
	}
	return harness.ReflinkInventory(t, filepath.Join(e.root, "store"), "volumes", "goldens")
}

// expected is what the inventory must hold given the plugin's volumes and goldens: anything
// more has leaked, anything less is listed but missing.
func (e *env) expected(t *testing.T, vols []volume, gs []driver.Golden) []string {
	var out []string
	if e.backend == "zfs" {
		out = append(out, e.parent+"/vol", e.parent+"/golden")
		for _, v := range vols {
			out = append(out, e.parent+"/vol/"+v.Name)
		}
		for _, g := range gs {
			out = append(out, e.parent+"/golden/"+g.Project)
			for _, gen := range g.Generations {
				lineage, _, _ := strings.Cut(gen.Source, "@")
				out = append(out, lineage, gen.Source)
			}
			if g.Partial != nil { // kept for a resume, and listed (zfsstore/transfer.go)
				out = append(out, e.parent+"/golden/"+g.Project+"/g"+strconv.Itoa(g.Partial.Generation))
			}
		}
	} else {
		store := filepath.Join(e.root, "store")
		kept := harness.ReflinkKept(t, store)
		out = append(out, "volumes", "goldens")
		for _, v := range vols {
			out = append(out, "volumes/"+v.Name+".img")
			if v.Mountpoint != "" || kept[filepath.Join(store, "volumes", v.Name+".img")] {
				out = append(out, "loop:"+filepath.Join(store, "volumes", v.Name+".img"))
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

// partial is the partial receive the plugin keeps for project (nil: none).
func (e *env) partial(t *testing.T, project string) *driver.PartialReceive {
	t.Helper()
	for _, g := range e.goldens(t) {
		if g.Project == project {
			return g.Partial
		}
	}
	return nil
}

// forkSnapshots returns the fork snapshots among got (zfsstore/fork.go) that a listed volume is
// a clone of: those belong to the volume. One that no listed volume hangs off has leaked.
func (e *env) forkSnapshots(t *testing.T, got []string, vols []volume) []string {
	t.Helper()
	var out []string
	for _, name := range got {
		if e.backend != "zfs" || !strings.Contains(name, "@fork-") {
			continue
		}
		clones := strings.Split(strings.TrimSpace(harness.Run(t, "zfs", "get", "-H", "-o", "value", "clones", name)), ",")
		for _, v := range vols {
			if slices.Contains(clones, e.parent+"/vol/"+v.Name) {
				out = append(out, name)
				break
			}
		}
	}
	return out
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

// mountsUnder lists the mountpoints at or below dir.
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
	slices.Sort(out)
	return out
}

// dockerNames is Docker's view of this plugin's volumes (docker volume ls --filter driver=).
// The driver filter keeps Docker from asking every legacy plugin it ever knew (each dead one
// costs a 15 s retry).
func (e *env) dockerNames(t *testing.T) []string {
	t.Helper()
	var ls struct{ Volumes []struct{ Name string } }
	filter := url.QueryEscape(`{"driver":["` + e.p.Name + `"]}`)
	if err := do(dockerSocket, "GET", "/volumes?filters="+filter, nil, &ls); err != nil {
		t.Fatalf("docker volume ls: %v", err)
	}
	var names []string
	for _, v := range ls.Volumes {
		names = append(names, v.Name)
	}
	slices.Sort(names)
	return names
}

type dockerVolume struct {
	Name   string
	Driver string
	Status map[string]any
}

// dockerInspect is docker volume inspect NAME.
func (e *env) dockerInspect(name string) (dockerVolume, error) {
	var v dockerVolume
	if err := do(dockerSocket, "GET", "/volumes/"+url.PathEscape(name), nil, &v); err != nil {
		return v, fmt.Errorf("docker volume inspect %s: %w", name, err)
	}
	return v, nil
}

// dockerCreateAPI creates a volume through Docker, for a scenario's preparation (the operation
// under test itself goes through the docker command line).
func (e *env) dockerCreateAPI(name string, opts map[string]string) error {
	return do(dockerSocket, "POST", "/volumes/create", map[string]any{"Name": name, "Driver": e.p.Name, "DriverOpts": opts}, nil)
}

// --- golden content -------------------------------------------------------------------------

const smallFiles = 12

// makeSmallTree writes a small tree for imports: the crash tests import many times, and what
// they prove is that an import completes or vanishes, not how cp -a handles a big tree.
func makeSmallTree(t *testing.T, dir string) {
	t.Helper()
	for i := 0; i < smallFiles; i++ {
		sub := filepath.Join(dir, fmt.Sprintf("d%d", i%3))
		if err := os.MkdirAll(sub, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(sub, fmt.Sprintf("f%02d", i)), []byte(fmt.Sprintf("small %d\n", i)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("d0/f00", filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
}

func checkSmallTree(dir string) error {
	for i := 0; i < smallFiles; i++ {
		p := filepath.Join(dir, fmt.Sprintf("d%d", i%3), fmt.Sprintf("f%02d", i))
		got, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if string(got) != fmt.Sprintf("small %d\n", i) {
			return fmt.Errorf("%s holds %q", p, got)
		}
	}
	if l, err := os.Readlink(filepath.Join(dir, "link")); err != nil || l != "d0/f00" {
		return fmt.Errorf("symlink: %q, %v", l, err)
	}
	return nil
}

// checkMarker checks what the promote scenarios write into a volume before promoting it.
func checkMarker(dir string) error {
	got, err := os.ReadFile(filepath.Join(dir, "marker"))
	if err != nil {
		return err
	}
	if !strings.HasPrefix(string(got), "promoted-") {
		return fmt.Errorf("marker holds %q", got)
	}
	return nil
}

// writeMarker mounts name through the socket, writes the promote marker, and unmounts it.
// readMarker reads back what writeMarker wrote to volume name ("" when it is missing).
func (e *env) readMarker(t *testing.T, name string) string {
	t.Helper()
	mp, err := e.mount(name, "marker-"+e.id)
	if err != nil {
		t.Errorf("mount %s: %v", name, err)
		return ""
	}
	b, _ := os.ReadFile(filepath.Join(mp, "marker"))
	if err := e.unmount(name, "marker-"+e.id); err != nil {
		t.Errorf("unmount %s: %v", name, err)
	}
	return string(b)
}

func (e *env) writeMarker(t *testing.T, name, content string) {
	t.Helper()
	mp, err := e.mount(name, "marker-"+e.id)
	if err != nil {
		t.Fatalf("mount %s: %v", name, err)
	}
	if err := os.WriteFile(filepath.Join(mp, "marker"), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := e.unmount(name, "marker-"+e.id); err != nil {
		t.Fatalf("unmount %s: %v", name, err)
	}
}
