package hostile

import (
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/zgolden/zgolden/tests/harness"
)

// TestSocketsRefuseOtherUsers checks that both sockets are root-owned and mode 0600, and that an
// unprivileged user can neither connect to them nor use the admin command line. The same
// programs run as root succeed, so the refusals are the sockets' doing.
func TestSocketsRefuseOtherUsers(t *testing.T) {
	e := startEnv(t, envOpts{})
	harness.RequireTools(t, "setpriv")
	for _, s := range []string{e.p.Socket, e.p.AdminSocket} {
		fi, err := os.Stat(s)
		if err != nil {
			t.Fatal(err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 || st.Uid != 0 || st.Gid != 0 {
			t.Errorf("%s: mode %v owner %d:%d; want a socket, 0600, root:root", s, fi.Mode(), st.Uid, st.Gid)
		}
	}
	// Copies an unprivileged user can execute: the build directories are root-only.
	dir, err := os.MkdirTemp("", "zgolden-nobody-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cli, dialer := filepath.Join(dir, "zgolden"), filepath.Join(dir, "dialer")
	copyFile(t, e.bin, cli)
	copyFile(t, self, dialer)

	nobody := []string{"setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--"}
	run := func(asNobody bool, env []string, argv ...string) (string, error) {
		if asNobody {
			argv = append(slices.Clone(nobody), argv...)
		}
		cmd := exec.Command(argv[0], argv[1:]...)
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	for _, s := range []string{e.p.Socket, e.p.AdminSocket} {
		tried.Add(1)
		if out, err := run(true, []string{dialEnv + "=" + s}, dialer); err == nil || !strings.Contains(out, "dial refused") {
			t.Errorf("an unprivileged user connects to %s: %v %s", s, err, out)
		} else {
			t.Logf("unprivileged connect to %s: %s", s, strings.TrimSpace(out))
		}
		if out, err := run(false, []string{dialEnv + "=" + s}, dialer); err != nil {
			t.Errorf("root cannot connect to %s with the same program: %v %s", s, err, out)
		}
	}
	for _, args := range [][]string{{"status"}, {"golden", "ls"}, {"golden", "rm", "prj"}, {"golden", "reclaim"}} {
		tried.Add(1)
		argv := append([]string{cli}, append(args, "--admin-socket", e.p.AdminSocket)...)
		if out, err := run(true, nil, argv...); err == nil || !strings.Contains(out, "permission denied") {
			t.Errorf("an unprivileged user runs zgolden %v: %v\n%s", args, err, out)
		}
	}
	if out, err := run(false, nil, cli, "status", "--admin-socket", e.p.AdminSocket); err != nil {
		t.Errorf("root cannot run zgolden status with the same binary: %v\n%s", err, out)
	}
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestLogsHoldNoSecrets starts the plugin with secret-looking values in its environment, drives
// it through successes, failures, hostile names and a restart at debug level, and checks that
// no environment value other than the documented ZGOLDEN_* settings reaches its log, and that no
// hostile name writes raw control characters into it (forged lines, terminal escapes).
func TestLogsHoldNoSecrets(t *testing.T) {
	secrets := map[string]string{
		"AWS_SECRET_ACCESS_KEY": "zgsecret-aws-" + harness.ID(),
		"GITHUB_TOKEN":          "zgsecret-gh-" + harness.ID(),
		"DOCKER_AUTH_CONFIG":    "zgsecret-docker-" + harness.ID(),
		"ZGOLDEN_API_TOKEN":     "zgsecret-undocumented-" + harness.ID(),
		"PASSWORD":              "zgsecret-pw-" + harness.ID(),
	}
	for k, v := range secrets {
		t.Setenv(k, v)
	}
	e := startEnv(t, envOpts{})
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "f"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := e.admin("golden", "import", src, "--project", "p"); err != nil {
		t.Fatalf("import: %v\n%s", err, out)
	}
	v := e.name("v")
	if err := e.create(v, map[string]string{"golden": "p"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.mount(v, "c"); err != nil {
		t.Fatal(err)
	}
	if out, err := e.admin("golden", "promote", v, "--project", "p"); err != nil {
		t.Fatalf("promote: %v\n%s", err, out)
	}
	if err := e.unmount(v, "c"); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"a\nlevel=error msg=forged", "\x1b[2J\x1b[31mred", "a\x00b", "a\rb"} {
		_ = e.create(bad, nil)
		_ = e.create(e.name("o"), map[string]string{"golden": bad})
		_, _ = e.admin("golden", "promote", bad, "--project", "p")
		tried.Add(3)
	}
	_, _, _ = e.raw("POST", "/VolumeDriver.Create", []byte(`{"Name": 5}`))
	logs := e.p.Logs()
	e.p.Stop(syscall.SIGKILL)
	e.p.Start() // the start-up log too
	if err := e.remove(v); err != nil {
		t.Fatal(err)
	}
	logs += e.p.Logs()

	for k, val := range secrets {
		if strings.Contains(logs, val) {
			t.Errorf("the plugin's log shows the value of $%s", k)
		}
	}
	for i, line := range strings.Split(logs, "\n") {
		if strings.ContainsAny(line, "\x00\x1b\r") {
			t.Errorf("log line %d carries a raw control character: %q", i+1, line)
		}
		if strings.HasPrefix(line, "level=error msg=forged") {
			t.Errorf("a hostile name forged log line %d: %q", i+1, line)
		}
	}
	if !strings.Contains(logs, "level=debug") || !strings.Contains(logs, "not allowed") {
		t.Fatalf("the log does not show the debug-level requests and refusals this test made; the check saw nothing:\n%s", logs)
	}
}

// TestRefusesForeignParentOrRoot starts the real binary on a parent dataset (ZFS) or store root
// (reflink) that already holds things zgolden did not create: it must refuse, say how to
// override, and touch nothing; with --adopt it starts, serves, and leaves the foreign things be.
func TestRefusesForeignParentOrRoot(t *testing.T) {
	harness.RequireRoot(t)
	bin := harness.Binary(t)
	tmp := t.TempDir()
	args := []string{"serve", "--socket", filepath.Join(tmp, "p.sock"), "--state-dir", filepath.Join(tmp, "state"),
		"--mount-root", filepath.Join(tmp, "mounts"), "--default-size", "1G"}
	// foreign reads the things zgolden did not create; inside lists everything under the parent
	// or root, to prove a refused start made nothing there.
	var backendArgs []string
	var foreign, inside func(t *testing.T) []string
	if os.Getenv("ZGOLDEN_TEST_ZPOOL") != "" {
		parent := harness.ZFSParent(t)
		harness.Run(t, "zfs", "create", "-o", "mountpoint=none", parent)
		harness.Run(t, "zfs", "create", "-V", "64M", "-s", parent+"/database")
		harness.Run(t, "zfs", "create", parent+"/home")
		harness.Run(t, "zfs", "snapshot", "-r", parent+"@backup")
		backendArgs = []string{"--backend", "zfs", "--parent", parent}
		foreign = func(t *testing.T) []string {
			out := harness.Run(t, "zfs", "list", "-H", "-t", "all", "-o", "name,guid,volsize",
				parent+"/database", parent+"/home", parent+"@backup", parent+"/database@backup", parent+"/home@backup")
			return strings.Split(strings.TrimSpace(out), "\n")
		}
		inside = func(t *testing.T) []string {
			out := harness.Run(t, "zfs", "list", "-H", "-r", "-t", "all", "-o", "name", parent)
			owner := harness.Run(t, "zfs", "get", "-H", "-o", "value", "zgolden:owner", parent)
			return append(strings.Split(strings.TrimSpace(out), "\n"), "owner="+strings.TrimSpace(owner))
		}
	} else {
		root := filepath.Join(tmp, "root")
		if err := os.MkdirAll(filepath.Join(root, "photos"), 0o755); err != nil {
			t.Fatal(err)
		}
		for _, f := range []string{"precious.txt", "photos/1.jpg"} {
			if err := os.WriteFile(filepath.Join(root, f), []byte("not zgolden's: "+f), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		t.Cleanup(func() { _, _ = harness.Output("umount", filepath.Join(root, "store")) })
		backendArgs = []string{"--backend", "reflink", "--root", root, "--store-size", "2G"}
		foreign = func(t *testing.T) []string {
			var out []string
			for _, f := range []string{"precious.txt", "photos/1.jpg"} {
				data, err := os.ReadFile(filepath.Join(root, f))
				out = append(out, f+"="+string(data)+errString(err))
			}
			return out
		}
		inside = func(t *testing.T) []string { return topEntries(root) }
	}
	before, insideBefore := foreign(t), inside(t)
	tried.Add(1)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, append(args, backendArgs...)...)
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	switch {
	case ctx.Err() != nil:
		t.Fatalf("zgolden serve started on a parent or root holding foreign things (killed after 60 s):\n%s", out)
	case !errors.As(err, &exit):
		t.Fatalf("zgolden serve: %v\n%s", err, out)
	}
	t.Logf("zgolden serve refused: %s", lastLines(string(out), 1))
	if !strings.Contains(string(out), "--adopt") || !strings.Contains(string(out), "did not create") {
		t.Errorf("the refusal does not say what is wrong and how to override it:\n%s", out)
	}
	if got := foreign(t); !slices.Equal(got, before) {
		t.Errorf("a refused start changed the foreign things: %v -> %v", before, got)
	}
	if got := inside(t); !slices.Equal(got, insideBefore) {
		t.Errorf("a refused start made or changed something: %v -> %v", insideBefore, got)
	}

	// Told to share, it starts and works, and leaves the foreign things alone.
	p := harness.StartPlugin(t, pluginName, append(backendArgs, "--adopt", "--default-size", "1G")...)
	e := &env{p: p, id: harness.ID()}
	e.stillServing(t, "--adopt")
	p.Stop(syscall.SIGTERM)
	if got := foreign(t); !slices.Equal(got, before) {
		t.Errorf("running with --adopt changed the foreign things: %v -> %v", before, got)
	}
}

func errString(err error) string {
	if err != nil {
		return " (" + err.Error() + ")"
	}
	return ""
}
