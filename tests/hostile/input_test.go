package hostile

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/zgolden/zgolden/tests/harness"
)

// parallel runs jobs on n goroutines. The refusals it is used for are independent, and under
// emulation each docker or zgolden process costs a second or two.
func parallel(n int, jobs []func()) {
	ch := make(chan func())
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range ch {
				j()
			}
		}()
	}
	for _, j := range jobs {
		ch <- j
	}
	close(ch)
	wg.Wait()
}

// badName is a volume name zgolden must refuse, with what the refusal must say.
type badName struct {
	name, want string
}

// badNames are names with path parts, dataset-name syntax, spaces, control characters, unicode,
// shell syntax, and lengths zgolden must refuse.
func badNames() []badName {
	const chars = "is not allowed"
	out := []badName{{"", "is empty"}, {strings.Repeat("a", 97), "bytes long"}, {strings.Repeat("x", 4096), "bytes long"}}
	for _, n := range []string{
		"a/b", "../x", "..", ".", "a/../../b", "/abs", "./x", "x/", "a@b", "snap@gen1", "a%b", "%",
		"a b", " lead", "trail ", "a\x00b", "\x00", "a\nb", "a\tb", "a\rb", "\x1b[31mred", "a\x7fb",
		"ünïcödé", "日本語", "emoji😀", "é", "a..b", "-rf", ".hidden", "_x", "a;rm -rf /", "$(reboot)",
		"`id`", "a|b", "a*b", "a?b", `a\b`, "a:b", "a,b", "a=b", "a'b", `a"b`, "zgolden:owner", "a\u200bb",
	} {
		out = append(out, badName{n, chars})
	}
	return out
}

// badOpts are Create options zgolden must refuse: ZFS properties to inject, sizes that are zero,
// negative, overflowing or in unknown units, golden and project names with path parts, and
// generations that do not exist. base is a project that has generation 1.
func badOpts(base, parentLike string) []struct {
	opts map[string]string
	want string
} {
	type c = struct {
		opts map[string]string
		want string
	}
	o := func(kv ...string) map[string]string {
		m := map[string]string{}
		for i := 0; i < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return m
	}
	out := []c{
		{o("mountpoint", "/etc"), "unknown option"}, {o("canmount", "on"), "unknown option"},
		{o("dedup", "on"), "unknown option"}, {o("volsize", "1G"), "unknown option"},
		{o("compression", "off"), "unknown option"}, {o("zgolden:state", "ready"), "unknown option"},
		{o("origin", parentLike+"/x@y"), "unknown option"}, {o("Size", "1G"), "unknown option"},
		{o("size", "1G", "mountpoint", "/"), "unknown option"}, {o("refquota", "1"), "unknown option"},
		{o("-o dedup", "on"), "unknown option"}, {o("", ""), "unknown option"},
		{o("sharenfs", "on"), "unknown option"}, {o("readonly", "off"), "unknown option"},
		{o("golden", ""), "is empty"}, {o("golden", strings.Repeat("p", 65)), "bytes long"},
		{o("generation", "1"), "needs golden"}, {o("cold", "deny"), "needs golden"},
		{o("golden", base, "generation", "99"), "has no generation 99"},
		{o("golden", "nosuch", "generation", "3"), "has no generations"},
		{o("golden", "nosuch", "cold", "deny"), "cold=deny"},
		{o("golden", base, "cold", "maybe"), "must be allow or deny"},
		{o("type", "zvol"), "must be block or fs"}, {o("type", "BLOCK"), "must be block or fs"},
		{o("type", ""), "must be block or fs"}, {o("type", "block;mountpoint=/"), "must be block or fs"},
		{o("golden", base, "size", "512M"), "can only grow"},
	}
	for _, g := range []string{"../etc", "a/b", "/etc", "p@gen1", "p%x", "..", "a b", "ünï", parentLike, "golden/" + base, "x\x00y"} {
		out = append(out, c{o("golden", g), "not allowed"})
	}
	for _, n := range []string{"0", "-1", "1.5", "abc", "99999999999999999999", "0x1", " 1", "1e3", ""} {
		out = append(out, c{o("golden", base, "generation", n), "positive integer"})
	}
	for size, want := range map[string]string{
		"0": "zero", "0G": "zero", "-1G": "not a size", "-1": "not a size", "+1G": "not a size",
		"1e3G": "not a size", "NaN": "not a size", "Inf": "not a size", "": "not a size", " ": "not a size",
		"1G;rm -rf /": "not a size", "\uff11G": "not a size", "0x40000000": "not a size", "1..5G": "not a size",
		"1Q": "unknown unit", "1GiBB": "unknown unit", "10XB": "unknown unit", "5 parsecs": "unknown unit",
		"18446744073709551616": "too large", "17179869184G": "too large", "1025P": "too large",
		"99999999999999999999999P": "too large", "1.5": "whole number", "1.0000000000000000001G": "whole number",
		"1k": "below the minimum", "511M": "below the minimum", "1": "below the minimum",
	} {
		out = append(out, c{o("size", size), want})
	}
	return out
}

// TestHostileVolumeRequests sends hostile names, options and mount IDs through the real plugin
// socket, as Docker would forward them. Every one gets a clear error (or, for IDs, which are
// opaque, is handled without ever becoming a path); nothing is created inside the parent or
// root; nothing outside it changes; names that match zgolden's own internal names stay ordinary
// volumes; and the plugin keeps serving.
func TestHostileVolumeRequests(t *testing.T) {
	e := startEnv(t, envOpts{})
	outside := e.plantCanaries(t)
	base := "base"
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "f"), []byte("golden"), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := e.admin("golden", "import", src, "--project", base); err != nil {
		t.Fatalf("import: %v\n%s", err, out)
	}
	before, beforeOut, beforeList := e.inventory(t), outside(t), e.list(t)
	n := 0
	reject := func(what string, err error, want string) {
		t.Helper()
		n++
		tried.Add(1)
		if err == nil {
			t.Errorf("%s: accepted; want an error saying %q", what, want)
			return
		}
		if cerr := clearError(err.Error(), want); cerr != nil {
			t.Errorf("%s: %v: %q", what, cerr, err)
		}
	}
	for _, b := range badNames() {
		q := fmt.Sprintf("%q", b.name)
		if len(q) > 40 {
			q = q[:40] + "..."
		}
		reject("Create "+q, e.create(b.name, nil), b.want)
		reject("Create with a golden "+q, e.create(b.name, map[string]string{"golden": base}), b.want)
		reject("Remove "+q, e.remove(b.name), b.want)
		_, err := e.mount(b.name, "id")
		reject("Mount "+q, err, b.want)
		reject("Unmount "+q, e.unmount(b.name, "id"), b.want)
		reject("Get "+q, e.call("Get", map[string]string{"Name": b.name}, nil), b.want)
		reject("Path "+q, e.call("Path", map[string]string{"Name": b.name}, nil), b.want)
		// A golden project name is checked the same way, in every option that carries one.
		if b.want == "is not allowed" {
			reject("Create with golden="+q, e.create(e.name("g"), map[string]string{"golden": b.name}), "not allowed")
		}
	}
	for _, c := range badOpts(base, e.parent+e.root) {
		reject(fmt.Sprintf("Create -o %q", c.opts), e.create(e.name("o"), c.opts), c.want)
	}
	// Mount IDs are opaque to the plugin: hostile ones work as IDs and never become paths.
	v := e.name("ids")
	if err := e.create(v, nil); err != nil {
		t.Fatal(err)
	}
	_, err := e.mount(v, "")
	reject("Mount with an empty ID", err, "no caller ID")
	pwn := filepath.Join(e.p.MountRoot, "..", "..", "zgolden-pwn-"+e.id)
	for _, id := range []string{"../../../../" + pwn, "a\x00b", "\x1b[2J", strings.Repeat("i", 64<<10), "/etc/passwd"} {
		n++
		tried.Add(1)
		if _, err := e.mount(v, id); err != nil {
			t.Errorf("Mount with an opaque hostile ID: %v", err)
		}
		if err := e.unmount(v, id); err != nil {
			t.Errorf("Unmount with an opaque hostile ID: %v", err)
		}
	}
	if _, err := os.Stat(filepath.Clean(pwn)); err == nil {
		t.Errorf("a mount ID became a path: %s exists", pwn)
	}
	if m := mountsUnder(t, e.p.MountRoot); len(m) > 0 {
		t.Errorf("hostile IDs left mounts: %v", m)
	}
	if err := e.remove(v); err != nil {
		t.Fatal(err)
	}

	if got := e.inventory(t); !slices.Equal(got, before) {
		t.Errorf("hostile requests changed the backend: %s", diff(before, got))
	}
	if got := e.list(t); !slices.Equal(got, beforeList) {
		t.Errorf("hostile requests created volumes: %v", got)
	}
	if got := outside(t); !slices.Equal(got, beforeOut) {
		t.Errorf("hostile requests touched something outside the parent or root: %s", diff(beforeOut, got))
	}

	// Names equal to zgolden's internal names are ordinary volume names: they land where every
	// volume does and touch nothing of the golden tree or the store's own files.
	for _, name := range []string{"vol", "golden", "volumes", "store.img", "mounts", base, "gen1"} {
		n++
		tried.Add(1)
		if err := e.create(name, map[string]string{"golden": base}); err != nil {
			t.Errorf("Create %q (an ordinary name that matches an internal one): %v", name, err)
			continue
		}
		want := []string{e.parent + "/vol/" + name}
		if e.backend == "reflink" {
			want = []string{"volumes/" + name + ".img"}
		}
		added := minus(e.inventory(t), before)
		if e.backend == "reflink" && len(added) == 2 {
			// A claimed spare's XFS stays mounted at its kept mount (reflinkstore/spares.go):
			// its loop device is the volume's own.
			want = append(want, "loop:"+filepath.Join(e.root, "store", want[0]))
			slices.Sort(want)
		}
		if !slices.Equal(added, want) {
			t.Errorf("Create %q added %v; want only %v", name, added, want)
		}
		if gs := e.goldens(t); len(gs) != 1 || gs[0].Project != base || len(gs[0].Generations) != 1 {
			t.Errorf("Create %q changed the goldens: %+v", name, gs)
		}
		mp, err := e.mount(name, "c")
		if err != nil {
			t.Errorf("mount %q: %v", name, err)
		} else if got, err := os.ReadFile(filepath.Join(mp, "f")); err != nil || string(got) != "golden" {
			t.Errorf("volume %q does not hold the golden: %q, %v", name, got, err)
		}
		if err := e.unmount(name, "c"); err != nil {
			t.Errorf("unmount %q: %v", name, err)
		}
		if err := e.remove(name); err != nil {
			t.Errorf("remove %q: %v", name, err)
		}
	}
	if got := e.inventory(t); !slices.Equal(got, before) {
		t.Errorf("volumes with internal names left: %s", diff(before, got))
	}
	if got := outside(t); !slices.Equal(got, beforeOut) {
		t.Errorf("something outside the parent or root changed: %s", diff(beforeOut, got))
	}
	e.stillServing(t, "the hostile requests")
	t.Logf("%d hostile volume requests tried through the plugin socket", n)
}

// TestMalformedRequests sends what no Docker engine would: truncated JSON, wrong types, huge and
// deeply nested bodies, invalid UTF-8, wrong methods and unknown endpoints. Each gets an error
// reply, nothing is created, and the plugin keeps serving.
func TestMalformedRequests(t *testing.T) {
	e := startEnv(t, envOpts{})
	outside := e.plantCanaries(t)
	before, beforeOut := e.inventory(t), outside(t)
	huge := func(n int) []byte {
		b, _ := json.Marshal(map[string]string{"Name": strings.Repeat("z", n)})
		return b
	}
	manyOpts := func(n int) []byte {
		opts := map[string]string{}
		for i := 0; i < n; i++ {
			opts[fmt.Sprintf("k%06d", i)] = "v"
		}
		b, _ := json.Marshal(map[string]any{"Name": e.name("many"), "Opts": opts})
		return b
	}
	bodies := map[string][]byte{
		"empty":                  nil,
		"truncated":              []byte(`{"Name": "` + e.name("t")),
		"only a brace":           []byte("{"),
		"name is a number":       []byte(`{"Name": 5}`),
		"name is a list":         []byte(`{"Name": ["a"]}`),
		"name is an object":      []byte(`{"Name": {"a": 1}}`),
		"opts is a string":       []byte(`{"Name": "x", "Opts": "size=1G"}`),
		"opts value is a number": []byte(`{"Name": "x", "Opts": {"size": 1}}`),
		"a bare string":          []byte(`"Create"`),
		"an array":               []byte(`[1, 2]`),
		"null":                   []byte(`null`),
		"duplicate keys":         []byte(`{"Name": "ok", "Name": "../x"}`),
		"lone surrogate":         []byte(`{"Name": "\ud800"}`),
		"invalid utf-8":          append(append([]byte(`{"Name": "`), 0xff, 0xfe), []byte(`"}`)...),
		"nested 100000 deep":     bytes.Repeat([]byte("["), 100000),
		"8 MiB name":             huge(8 << 20),
		"50000 options":          manyOpts(50000),
		"NUL bytes":              []byte("{\"Name\"\x00: \"x\"}"),
		"xml":                    []byte(`<Name>x</Name>`),
	}
	n := 0
	for _, ep := range []string{"Create", "Remove", "Mount", "Unmount", "Get", "Path"} {
		for what, body := range bodies {
			if strings.Contains(what, "opt") && ep != "Create" {
				continue // only Create reads options; elsewhere the body names a valid unknown volume, which Remove and Unmount rightly accept
			}
			n++
			tried.Add(1)
			status, reply, err := e.raw("POST", "/VolumeDriver."+ep, body)
			if err != nil {
				t.Errorf("%s with %s: no reply: %v", ep, what, err)
				continue
			}
			var r struct{ Err string }
			_ = json.Unmarshal([]byte(reply), &r)
			if status == http.StatusOK && r.Err == "" {
				t.Errorf("%s with %s: accepted (HTTP 200, %.200q)", ep, what, reply)
				continue
			}
			msg := strings.TrimSpace(reply)
			if r.Err != "" {
				msg = r.Err
			}
			if msg == "" {
				t.Errorf("%s with %s: HTTP %d with an empty reply", ep, what, status)
			} else if err := clearError(msg, ""); err != nil {
				t.Errorf("%s with %s: HTTP %d: %v: %.300q", ep, what, status, err, msg)
			}
		}
	}
	for _, c := range []struct{ method, path string }{
		{"GET", "/VolumeDriver.Create"}, {"PUT", "/VolumeDriver.Remove"}, {"POST", "/VolumeDriver.Destroy"},
		{"POST", "/VolumeDriver.Create/../../admin"}, {"POST", "/../../../etc/passwd"}, {"DELETE", "/VolumeDriver.Remove"},
	} {
		n++
		tried.Add(1)
		// go-plugins-helpers serves every method, so the body names an invalid volume: what
		// this proves is that odd methods and paths get an error and never crash the plugin.
		status, reply, err := e.raw(c.method, c.path, []byte(`{"Name": "../m"}`))
		if err != nil {
			t.Errorf("%s %s: no reply: %v", c.method, c.path, err)
			continue
		}
		var r struct{ Err string }
		_ = json.Unmarshal([]byte(reply), &r)
		if status == http.StatusOK && r.Err == "" {
			t.Errorf("%s %s: accepted: %q", c.method, c.path, reply)
		}
	}
	if got := e.list(t); len(got) > 0 {
		t.Errorf("malformed requests created volumes: %v", got)
	}
	if got := e.inventory(t); !slices.Equal(got, before) {
		t.Errorf("malformed requests changed the backend: %s", diff(before, got))
	}
	if got := outside(t); !slices.Equal(got, beforeOut) {
		t.Errorf("malformed requests touched something outside: %s", diff(beforeOut, got))
	}
	e.stillServing(t, "the malformed requests")
	t.Logf("%d malformed requests tried", n)
}

// TestHostileDockerCLI sends hostile names and options through the real docker command line,
// which passes them to the plugin unchanged: each is refused with the plugin's clear error,
// Docker records no volume, the backend is unchanged, and internal-looking names work as
// ordinary volumes.
func TestHostileDockerCLI(t *testing.T) {
	e := startEnv(t, envOpts{docker: true})
	outside := e.plantCanaries(t)
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "f"), []byte("golden"), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := e.admin("golden", "import", src, "--project", "base"); err != nil {
		t.Fatalf("import: %v\n%s", err, out)
	}
	before, beforeOut := e.inventory(t), outside(t)
	n := 0
	var jobs []func()
	try := func(what, want string, args ...string) {
		n++
		tried.Add(1)
		jobs = append(jobs, func() { refuseDocker(t, e, what, want, args...) })
	}
	for _, name := range []string{"a/b", "../x", "..", "a b", "a\nb", "ünïcödé", strings.Repeat("a", 100), "a@b", "a%b", "\x1b[31mred", "-rf", "a..b", "$(reboot)"} {
		want := "is not allowed"
		if len(name) > 96 {
			want = "bytes long"
		}
		try(fmt.Sprintf("%q", name), want, "--", name)
	}
	for _, c := range badOpts("base", e.parent+e.root) {
		if len(c.opts) != 1 { // the CLI test keeps to single options; the socket test does the rest
			continue
		}
		for k, v := range c.opts {
			if k == "" || strings.ContainsAny(k+v, "\x00") {
				continue // docker -o cannot carry these
			}
			try(fmt.Sprintf("-o %q", k+"="+v), c.want, "-o", k+"="+v, e.name("o"))
		}
	}
	parallel(4, jobs)
	if ls := strings.Fields(harness.DockerCmd(t, "volume", "ls", "-q", "--filter", "driver="+e.p.Name)); len(ls) > 0 {
		t.Errorf("docker lists volumes after only refused creates: %v", ls)
	}
	if got := e.inventory(t); !slices.Equal(got, before) {
		t.Errorf("refused docker creates changed the backend: %s", diff(before, got))
	}
	if got := outside(t); !slices.Equal(got, beforeOut) {
		t.Errorf("refused docker creates touched something outside: %s", diff(beforeOut, got))
	}
	// Internal-looking names are ordinary volumes through Docker too.
	for _, name := range []string{"vol", "golden"} {
		n++
		tried.Add(1)
		t.Cleanup(func() {
			// Only if Docker still has it: an unknown name makes Docker ask every plugin it ever
			// knew, waiting out each dead one.
			if slices.Contains(strings.Fields(harness.DockerCmd(t, "volume", "ls", "-q", "--filter", "driver="+e.p.Name)), name) {
				_, _ = harness.Output("docker", "volume", "rm", "-f", name)
			}
		})
		harness.DockerCmd(t, "volume", "create", "--driver", e.p.Name, "-o", "golden=base", name)
		out := harness.DockerCmd(t, "run", "--rm", "--network", "none", "-v", name+":/data", harness.BusyboxImage(), "cat", "/data/f")
		if out != "golden" {
			t.Errorf("volume %q through docker reads %q", name, out)
		}
		harness.DockerCmd(t, "volume", "rm", name)
	}
	if got := e.inventory(t); !slices.Equal(got, before) {
		t.Errorf("volumes left behind: %s", diff(before, got))
	}
	e.stillServing(t, "the hostile docker commands")
	t.Logf("%d hostile docker volume create commands tried", n)
}

// refuseDocker runs one docker volume create that must be refused with a message saying want.
func refuseDocker(t *testing.T, e *env, what, want string, args ...string) {
	out, err := harness.Output("docker", append([]string{"volume", "create", "--driver", e.p.Name}, args...)...)
	if err == nil {
		t.Errorf("docker volume create %s: accepted (%s)", what, strings.TrimSpace(out))
		// Docker may have recorded it: remove it so the checks below see the real damage.
		_, _ = harness.Output("docker", "volume", "rm", strings.TrimSpace(out))
		return
	}
	if !strings.Contains(out, want) {
		t.Errorf("docker volume create %s: %q does not say %q", what, strings.TrimSpace(out), want)
	}
}

// TestAdminAbuse sends bad names and paths to the admin API, through the zgolden command line
// and as raw HTTP: promote, import (of /, the state dir, the mount root, the store's own root),
// reclaim and golden rm. Each is refused with a clear error and nothing changes.
func TestAdminAbuse(t *testing.T) {
	e := startEnv(t, envOpts{})
	outside := e.plantCanaries(t)
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "f"), []byte("golden"), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := e.admin("golden", "import", src, "--project", "base"); err != nil {
		t.Fatalf("import: %v\n%s", err, out)
	}
	vol := e.name("v")
	if err := e.create(vol, map[string]string{"golden": "base"}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.remove(vol) })
	file := filepath.Join(src, "f")
	state := filepath.Dir(e.p.AdminSocket)
	before, beforeOut, beforeGoldens := e.inventory(t), outside(t), e.goldens(t)
	n := 0
	var jobs []func()
	refuse := func(want string, args ...string) {
		n++
		tried.Add(1)
		jobs = append(jobs, func() {
			out, err := e.admin(args...)
			if err == nil {
				t.Errorf("zgolden %q: accepted: %s", args, out)
				return
			}
			if cerr := clearError(out, want); cerr != nil {
				t.Errorf("zgolden %q: %v: %q", args, cerr, out)
			}
		})
	}
	for _, b := range []string{"../x", "a/b", "a@b", "a b", "ünï", "..", strings.Repeat("p", 200), "-", "x\ny"} {
		want := "not allowed"
		if len(b) > 96 {
			want = "bytes long"
		}
		if b == "-" {
			want = ""
		}
		refuse(want, "golden", "promote", b, "--project", "p")
		refuse(want, "golden", "promote", vol, "--project", b)
		refuse(want, "golden", "import", src, "--project", b)
		refuse(want, "golden", "reclaim", b)
		refuse(want, "golden", "rm", b)
	}
	refuse("not found", "golden", "promote", e.name("nosuch"), "--project", "p")
	refuse("--project is required", "golden", "promote", vol, "--project", "")
	refuse("does not exist", "golden", "rm", "nosuch")
	refuse("remove them first", "golden", "rm", "base")
	refuse("type must be block or fs", "golden", "import", src, "--project", "p", "--type", "zvol")
	imports := map[string]string{
		"/":                               "other than /",
		state:                             "overlaps",
		e.p.MountRoot:                     "overlaps",
		filepath.Join(state, "work"):      "overlaps",
		filepath.Dir(state):               "overlaps",
		filepath.Join(e.p.MountRoot, vol): "overlaps",
		"/nonexistent-" + e.id:            "not a directory",
		file:                              "not a directory",
	}
	if e.backend == "reflink" {
		imports[e.root] = "overlaps the reflink store"
		imports[filepath.Join(e.root, "store", "goldens")] = "overlaps the reflink store"
		imports[e.base] = "overlaps the reflink store"
	}
	i := 0
	for dir, want := range imports {
		// A project each: the refusals run in parallel, and two imports of one project at once
		// are refused as such before the source is looked at.
		i++
		refuse(want, "golden", "import", dir, "--project", fmt.Sprintf("evil%d", i))
		// With --remove-source too, but only for directories this test owns: were a refusal
		// ever to regress, the damage stays inside the test.
		if dir != "/" && dir != filepath.Dir(state) {
			i++
			refuse(want, "golden", "import", dir, "--project", fmt.Sprintf("evil%d", i), "--remove-source")
		}
	}

	parallel(4, jobs)

	// Raw HTTP, as any local root client could send it.
	admin := unixClient(e.p.AdminSocket)
	rawCases := []struct {
		method, path, body string
		want               string
	}{
		{"POST", "/v1/promote", `{"volume": "` + vol, "invalid request"},
		{"POST", "/v1/promote", `{"volume": "` + vol + `", "project": "p", "extra": 1}`, "unknown field"},
		{"POST", "/v1/promote", `{"volume": 5, "project": "p"}`, "invalid request"},
		{"POST", "/v1/promote", `{"volume": "../../x", "project": "p"}`, "not allowed"},
		{"POST", "/v1/promote", `{"volume": "` + vol + `", "project": "../p"}`, "not allowed"},
		{"POST", "/v1/import", `{"project": "p", "dir": "/"}`, "other than /"},
		{"POST", "/v1/import", `{"project": "p", "dir": "relative/dir"}`, "absolute path"},
		{"POST", "/v1/import", `{"project": "p", "dir": "` + state + `", "remove_source": true}`, "overlaps"},
		{"POST", "/v1/import", `{"project": "p", "dir": "` + src + `", "type": "zvol"}`, "block or fs"},
		{"POST", "/v1/import", `{"project": "p", "dir": "` + strings.Repeat("a", 2<<20) + `"}`, "too large"},
		{"POST", "/v1/reclaim", `{"project": "../x", "keep": 1}`, "not allowed"},
		{"POST", "/v1/reclaim", `{"keep": "many"}`, "invalid request"},
		{"DELETE", "/v1/goldens/..%2F..%2Fx", "", ""},
		{"DELETE", "/v1/goldens/a%00b", "", "not allowed"},
		{"DELETE", "/v1/goldens/%2E%2E", "", ""},
		{"GET", "/v1/../../../etc/passwd", "", ""},
		{"POST", "/v1/status", "", ""},
		// Golden streams: bad names, bad numbers, and bodies that are not streams or are the
		// wrong one. Each is refused with nothing received (the inventory check below).
		{"GET", "/v1/goldens/..%2Fx/export", "", ""},
		{"GET", "/v1/goldens/nosuch/export", "", "does not exist"},
		{"GET", "/v1/goldens/p/export?generation=-1", "", "generation number"},
		{"GET", "/v1/goldens/p/export?since=x", "", "generation number"},
		{"GET", "/v1/goldens/p/export?generation=2&since=5", "", "must be older"},
		{"POST", "/v1/goldens/a%00b/receive", "", "not allowed"},
		{"POST", "/v1/goldens/p/receive", "", "empty"},
		{"POST", "/v1/goldens/p/receive", "not a stream\n", "not a zgolden golden stream"},
		{"POST", "/v1/goldens/p/receive", strings.Repeat("x", 1<<20), "no header line"},
		{"POST", "/v1/goldens/p/receive", `{"format":"zgolden-golden-stream/1","backend":"zfs","project":"other","kind":"block","generation":1,"guid":"1"}` + "\n", "carries golden"},
		{"POST", "/v1/goldens/p/receive", `{"format":"zgolden-golden-stream/1","backend":"zfs","project":"p","kind":"block","generation":1,"guid":"1","evil":true}` + "\n", "not a zgolden golden stream"},
		{"POST", "/v1/goldens/p/receive", `{"format":"zgolden-golden-stream/1","backend":"zfs","project":"p","kind":"block","generation":9,"guid":"1"}` + "\nGARBAGE", ""},
	}
	for _, c := range rawCases {
		n++
		tried.Add(1)
		req, err := http.NewRequest(c.method, "http://zgolden"+c.path, strings.NewReader(c.body))
		if err != nil {
			t.Fatal(err)
		}
		r, err := admin.Do(req)
		if err != nil {
			t.Errorf("%s %s: no reply: %v", c.method, c.path, err)
			continue
		}
		var buf bytes.Buffer
		_, _ = buf.ReadFrom(r.Body)
		r.Body.Close()
		reply := buf.String()
		// An import streams NDJSON: a refusal found after the headers is an {"error": ...} line.
		failed := r.StatusCode >= 300 || strings.Contains(reply, `"error"`)
		if !failed {
			t.Errorf("%s %s %.80q: accepted: HTTP %d %.200q", c.method, c.path, c.body, r.StatusCode, reply)
			continue
		}
		if cerr := clearError(reply, c.want); cerr != nil {
			t.Errorf("%s %s %.80q: %v: HTTP %d %.300q", c.method, c.path, c.body, cerr, r.StatusCode, reply)
		}
	}

	if got := e.inventory(t); !slices.Equal(got, before) {
		t.Errorf("refused admin requests changed the backend: %s", diff(before, got))
	}
	if got := e.goldens(t); len(got) != len(beforeGoldens) || len(got[0].Generations) != 1 {
		t.Errorf("refused admin requests changed the goldens: %+v", got)
	}
	if got := outside(t); !slices.Equal(got, beforeOut) {
		t.Errorf("refused admin requests touched something outside: %s", diff(beforeOut, got))
	}
	if _, err := os.Stat(file); err != nil {
		t.Errorf("an import source was deleted: %v", err)
	}
	e.stillServing(t, "the admin abuse")
	t.Logf("%d hostile admin requests tried", n)
}
