package vmsmoke

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const cmdTimeout = 5 * time.Minute

// pool returns the pool the guest made, or skips the test on a host without one.
func pool(t *testing.T) string {
	t.Helper()
	p := os.Getenv("ZGOLDEN_TEST_ZPOOL")
	if p == "" {
		t.Skip("ZGOLDEN_TEST_ZPOOL is not set: real-ZFS smoke tests run only in the qemu guest (make test-vm)")
	}
	return p
}

// run executes argv (never through a shell) and returns its combined output.
func run(argv ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	if err != nil {
		err = fmt.Errorf("%s: %w: %s", strings.Join(argv, " "), err, strings.TrimSpace(out.String()))
	}
	return out.String(), err
}

// must runs argv and fails the test if it fails.
func must(t *testing.T, argv ...string) string {
	t.Helper()
	start := time.Now()
	out, err := run(argv...)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s (%.2fs)", strings.Join(argv, " "), time.Since(start).Seconds())
	return out
}

// waitDev polls for a device node: zfs create and zfs clone return before udev makes
// /dev/zvol/... (docs/design-facts.md, "Asynchronous device nodes").
func waitDev(t *testing.T, path string) {
	t.Helper()
	start := time.Now()
	deadline := start.Add(60 * time.Second)
	for {
		if fi, err := os.Stat(path); err == nil && fi.Mode()&os.ModeDevice != 0 {
			t.Logf("%s appeared after %.2fs", path, time.Since(start).Seconds())
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not appear within 60s", path)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// retry runs argv until it succeeds or the bound passes: udev or blkid may hold a zvol
// for a moment (docs/design-facts.md, "Busy devices").
func retry(argv ...string) error {
	var err error
	for i := 0; i < 20; i++ {
		if _, err = run(argv...); err == nil {
			return nil
		}
		time.Sleep(500 * time.Millisecond)
	}
	return err
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func lastMatch(s, sub string) string {
	lines := strings.Split(s, "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.Contains(lines[i], sub) {
			return strings.TrimSpace(lines[i])
		}
	}
	return ""
}

func TestModuleAndPool(t *testing.T) {
	p := pool(t)
	v, err := os.ReadFile("/sys/module/zfs/version")
	if err != nil {
		t.Fatalf("no zfs kernel module: %v", err)
	}
	if strings.TrimSpace(string(v)) == "" {
		t.Fatal("/sys/module/zfs/version is empty")
	}
	t.Logf("zfs module %s", strings.TrimSpace(string(v)))
	health := strings.TrimSpace(must(t, "zpool", "list", "-H", "-o", "health", p))
	if health != "ONLINE" {
		t.Fatalf("pool %s is %q, want ONLINE", p, health)
	}
	t.Logf("zfs version:\n%s", must(t, "zfs", "version"))
}

func TestZvolXFSClones(t *testing.T) {
	p := pool(t)
	name := fmt.Sprintf("vmsmoke-%d-%d", os.Getpid(), time.Now().UnixNano())
	origin := p + "/" + name
	snap := origin + "@gold"
	clones := []string{origin + "-c1", origin + "-c2"}
	dev := func(ds string) string { return "/dev/zvol/" + ds }

	// Not t.TempDir: its cleanup would run before the unmounts below (cleanups run last-in
	// first-out) and fail on the busy mount points.
	base, err := os.MkdirTemp("", "vmsmoke-")
	if err != nil {
		t.Fatal(err)
	}
	mounts := []string{}
	t.Cleanup(func() {
		for i := len(mounts) - 1; i >= 0; i-- {
			if err := retry("umount", mounts[i]); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		}
		if err := os.RemoveAll(base); err != nil {
			t.Errorf("cleanup: %v", err)
		}
		for _, ds := range append(append([]string{}, clones...), origin) {
			if _, err := run("zfs", "list", "-H", "-o", "name", ds); err != nil {
				continue // never created
			}
			if err := retry("zfs", "destroy", "-R", ds); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		}
	})
	mount := func(ds, dir string, opts ...string) error {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		argv := []string{"mount", "-t", "xfs"}
		if len(opts) > 0 {
			argv = append(argv, "-o", strings.Join(opts, ","))
		}
		argv = append(argv, dev(ds), dir)
		if _, err := run(argv...); err != nil {
			return err
		}
		mounts = append(mounts, dir)
		return nil
	}

	must(t, "zfs", "create", "-s", "-V", "1G", "-o", "volblocksize=8K", "-o", "dedup=off", origin)
	waitDev(t, dev(origin))
	t.Logf("mkfs.xfs: %s", must(t, "mkfs.xfs", "-q", dev(origin)))
	must(t, "zfs", "snapshot", snap)
	for _, c := range clones {
		must(t, "zfs", "clone", snap, c)
	}
	for _, c := range clones {
		waitDev(t, dev(c))
	}
	// Settle so udev's blkid probes do not race the mounts.
	if _, err := run("udevadm", "settle", "--timeout=30"); err != nil {
		t.Logf("udevadm settle: %v", err)
	}

	dirs := []string{filepath.Join(base, "c1"), filepath.Join(base, "c2")}
	if err := mount(clones[0], dirs[0]); err != nil {
		t.Fatalf("first clone must mount without nouuid: %v", err)
	}
	// Pitfall 1: the second clone carries the same XFS UUID, and the kernel refuses it.
	if err := mount(clones[1], dirs[1]); err == nil {
		t.Fatalf("mounting a second clone with the same XFS UUID without nouuid succeeded; the duplicate-UUID pitfall did not show")
	} else {
		t.Logf("without nouuid, as expected: %v", err)
	}
	// mount(8) only says "wrong fs type, bad option..."; the kernel log names the cause.
	klog := must(t, "dmesg")
	if !strings.Contains(klog, "duplicate UUID") {
		t.Fatalf("the second mount failed, but the kernel log does not say \"duplicate UUID\":\n%s", lastLines(klog, 20))
	}
	t.Logf("kernel: %s", lastMatch(klog, "duplicate UUID"))
	if err := mount(clones[1], dirs[1], "nouuid"); err != nil {
		t.Fatalf("mount -o nouuid of the second clone: %v", err)
	}

	files := []string{"one.txt", "two.txt"}
	for i, d := range dirs {
		if err := os.WriteFile(filepath.Join(d, files[i]), []byte("clone "+files[i]), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	must(t, "sync")
	for i, d := range dirs {
		got, err := os.ReadFile(filepath.Join(d, files[i]))
		if err != nil || string(got) != "clone "+files[i] {
			t.Fatalf("%s/%s = %q, %v", d, files[i], got, err)
		}
		other := filepath.Join(d, files[1-i])
		if _, err := os.Stat(other); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("clone isolation broken: %s exists (err %v)", other, err)
		}
	}

	// The origin saw neither clone's write.
	originDir := filepath.Join(base, "origin")
	if err := mount(origin, originDir, "nouuid", "ro"); err != nil {
		t.Fatalf("mount the origin: %v", err)
	}
	for _, f := range files {
		if _, err := os.Stat(filepath.Join(originDir, f)); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("origin isolation broken: %s exists (err %v)", f, err)
		}
	}

	status := must(t, "zpool", "status", "-D", p)
	if !strings.Contains(status, "no DDT entries") {
		t.Fatalf("zpool status -D %s does not report \"no DDT entries\":\n%s", p, status)
	}
}

// TestDockerImages proves the guest's Docker engine and the images from
// tests/setup/images.sh work, and that the dind image runs a real inner engine whose
// /var/lib/docker is XFS on a zvol: the shape the e2e tests use.
func TestDockerImages(t *testing.T) {
	p := pool(t)
	images := os.Getenv("ZGOLDEN_IMAGES")
	if images == "" {
		t.Skip("ZGOLDEN_IMAGES is not set")
	}
	tag := fmt.Sprintf("%d-%d", os.Getpid(), time.Now().UnixNano())
	bbImg, dindImg := "vmsmoke-busybox:"+tag, "vmsmoke-dind:"+tag
	ctr := "vmsmoke-dind-" + tag
	vol := p + "/vmsmoke-dind-" + tag
	dir, err := os.MkdirTemp("", "vmsmoke-dind-")
	if err != nil {
		t.Fatal(err)
	}
	mounted := false
	t.Cleanup(func() {
		_, _ = run("docker", "rm", "-f", ctr)
		_, _ = run("docker", "rmi", "-f", bbImg)
		if strings.HasPrefix(dindImg, "vmsmoke-") {
			_, _ = run("docker", "rmi", "-f", dindImg)
		}
		if mounted {
			if err := retry("umount", dir); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		}
		if _, err := run("zfs", "list", "-H", "-o", "name", vol); err == nil {
			if err := retry("zfs", "destroy", "-R", vol); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		}
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})

	must(t, "docker", "import", filepath.Join(images, "busybox.tar"), bbImg)
	if out := must(t, "docker", "run", "--rm", bbImg, "echo", "busybox-ok"); strings.TrimSpace(out) != "busybox-ok" {
		t.Fatalf("busybox image printed %q", out)
	}

	must(t, "zfs", "create", "-s", "-V", "4G", "-o", "volblocksize=8K", "-o", "dedup=off", vol)
	waitDev(t, "/dev/zvol/"+vol)
	must(t, "mkfs.xfs", "-q", "/dev/zvol/"+vol)
	must(t, "mount", "-t", "xfs", "-o", "discard", "/dev/zvol/"+vol, dir)
	mounted = true

	// The guest boots with dind preloaded (build-guest.sh): importing its 470 MB under TCG
	// takes minutes. Import only when it is missing.
	if pre := os.Getenv("ZGOLDEN_DIND_IMAGE"); pre != "" {
		if _, err := run("docker", "image", "inspect", pre); err == nil {
			dindImg = pre
		} else {
			t.Logf("preloaded %s missing (%v); importing", pre, err)
		}
	}
	if strings.HasPrefix(dindImg, "vmsmoke-") {
		must(t, "docker", "import", filepath.Join(images, "dind.tar"), dindImg)
	}
	must(t, "docker", "run", "-d", "--privileged", "--name", ctr, "-v", dir+":/var/lib/docker", dindImg, "dind-dockerd")
	start := time.Now()
	for {
		out, err := run("docker", "exec", ctr, "docker", "info", "--format", "{{.Driver}} {{.ServerVersion}}")
		if err == nil {
			t.Logf("inner engine ready after %.1fs: %s", time.Since(start).Seconds(), strings.TrimSpace(out))
			break
		}
		if time.Since(start) > 90*time.Second {
			logs, _ := run("docker", "logs", "--tail", "30", ctr)
			t.Fatalf("inner dockerd not ready within 90s: %v\n%s", err, logs)
		}
		time.Sleep(time.Second)
	}
	must(t, "docker", "exec", ctr, "docker", "import", "/zgolden-images/busybox.tar", "bb")
	out := must(t, "docker", "exec", ctr, "docker", "run", "--rm", "--network", "none", "bb", "echo", "inner-ok")
	if strings.TrimSpace(out) != "inner-ok" {
		t.Fatalf("inner container printed %q", out)
	}
	if out, err := run("docker", "exec", ctr, "docker", "run", "--rm", "bb", "echo", "inner-default-net-ok"); err != nil {
		t.Logf("inner container on the default network (not needed by the tests): %v", err)
	} else {
		t.Logf("inner container on the default network: %s", strings.TrimSpace(out))
	}
	// The inner engine's data is on the zvol's XFS.
	if _, err := os.Stat(filepath.Join(dir, "overlay2")); err != nil {
		t.Fatalf("the inner engine did not use the XFS volume: %v", err)
	}
}
