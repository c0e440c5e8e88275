package harness

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// The images tests use; there is no registry, so they come from rootfs tarballs. The guest
// preloads them into its engine at build time (importing the dind tarball under emulation takes
// minutes) and names them in ZGOLDEN_BUSYBOX_IMAGE and ZGOLDEN_DIND_IMAGE. On the host they are
// imported under a tag naming images.sh's cache key, so a changed image list is re-imported.
func BusyboxImage() string { return imageName("ZGOLDEN_BUSYBOX_IMAGE", "busybox") }

// DindImage is the Docker-in-Docker image (see BusyboxImage).
func DindImage() string { return imageName("ZGOLDEN_DIND_IMAGE", "dind") }

func imageName(env, name string) string {
	if v := os.Getenv(env); v != "" {
		return v
	}
	imagesOnce.Do(func() { imagesTag, imagesErr = importImages() })
	return "zgolden-test/" + name + ":" + imagesTag
}

var (
	engineOnce sync.Once
	engineErr  string
	imagesOnce sync.Once
	imagesErr  string
	imagesTag  string
)

// repoRoot finds the repository from a test's working directory (its package directory).
func repoRoot() string {
	dir, _ := os.Getwd()
	for d := dir; d != "/"; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d
		}
	}
	return dir
}

// Docker makes sure a real Docker engine answers (starting Debian's dockerd on the host when
// needed) and that the test images exist. Without root, a docker client or dockerd, the test is
// skipped with the reason; a set-up that should work but fails fails the test.
func Docker(t testing.TB) {
	t.Helper()
	RequireRoot(t)
	RequireTools(t, "docker")
	engineOnce.Do(func() {
		if _, err := Output("docker", "info"); err == nil {
			return
		}
		if InGuest() {
			engineErr = "the guest's dockerd is not answering (see the guest console log)"
			return
		}
		if out, err := Output("bash", filepath.Join(repoRoot(), "tests/setup/docker-engine.sh")); err != nil {
			engineErr = "tests/setup/docker-engine.sh: " + err.Error() + "\n" + out
		}
	})
	if engineErr != "" {
		t.Fatalf("Docker engine: %s", engineErr)
	}
	imagesOnce.Do(func() { imagesTag, imagesErr = importImages() })
	if imagesErr != "" {
		t.Fatalf("test images: %s", imagesErr)
	}
}

// importImages imports the busybox and Docker-in-Docker rootfs tarballs, from $ZGOLDEN_IMAGES
// or from tests/setup/images.sh's cache (built on first use), and returns their tag.
func importImages() (tag, problem string) {
	if os.Getenv("ZGOLDEN_BUSYBOX_IMAGE") != "" && os.Getenv("ZGOLDEN_DIND_IMAGE") != "" {
		return "", "" // preloaded (the guest)
	}
	tars := map[string]string{}
	if dir := os.Getenv("ZGOLDEN_IMAGES"); dir != "" {
		tars["busybox"] = filepath.Join(dir, "busybox.tar")
		tars["dind"] = filepath.Join(dir, "dind.tar")
	} else {
		out, err := exec.Command("bash", filepath.Join(repoRoot(), "tests/setup/images.sh")).Output()
		if err != nil {
			return "", "tests/setup/images.sh: " + err.Error()
		}
		for _, line := range strings.Split(string(out), "\n") {
			if k, v, ok := strings.Cut(line, "="); ok && (k == "busybox" || k == "dind") {
				tars[k] = v
			}
		}
	}
	if len(tars) != 2 {
		return "", "images.sh did not name both tarballs"
	}
	// The cache directory is named images-<key>; its key becomes the tag.
	tag = strings.TrimPrefix(filepath.Base(filepath.Dir(tars["dind"])), "images-")
	if tag == "" || strings.ContainsAny(tag, "/:") {
		tag = "latest"
	}
	for name, tar := range tars {
		image := "zgolden-test/" + name + ":" + tag
		if _, err := Output("docker", "image", "inspect", image); err == nil {
			continue
		}
		if out, err := Output("docker", "import", tar, image); err != nil {
			return "", "docker import " + tar + ": " + err.Error() + "\n" + out
		}
	}
	return tag, ""
}

// DockerCmd runs the real docker command line and fails the test with its output on error.
func DockerCmd(t testing.TB, args ...string) string {
	t.Helper()
	return strings.TrimSpace(Run(t, "docker", args...))
}

// DindArgs are the `docker run` flags for a Docker-in-Docker container. Normally --privileged.
// Where this process's capability bounding set is incomplete (a sandboxed host), runc cannot
// grant --privileged's full set, so the container gets every capability the host has, no
// seccomp or AppArmor confinement, all devices, and the host's cgroup mounts, which is what an
// inner dockerd needs.
func DindArgs(t testing.TB) []string {
	t.Helper()
	if fullCapabilities() {
		return []string{"--privileged"}
	}
	return []string{
		"--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
		"--security-opt", "apparmor=unconfined", "--security-opt", "seccomp=unconfined",
		"--security-opt", "systempaths=unconfined", "--device-cgroup-rule", "a *:* rwm",
		"--tmpfs", "/run", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
	}
}

func fullCapabilities() bool {
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return false
	}
	last, err := os.ReadFile("/proc/sys/kernel/cap_last_cap")
	if err != nil {
		return false
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(last)))
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "CapBnd:"); ok {
			bnd, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return err == nil && bnd == (uint64(1)<<(n+1))-1
		}
	}
	return false
}
