package stress

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"testing"
)

const privateNSEnv = "ZGOLDEN_TEST_PRIVATE_MOUNT_NS"

// TestMain re-runs the tests in a private mount namespace when it can (as reflinkstore's tests
// do). A mount namespace created elsewhere on the host while the stress test has hundreds of
// volumes coming and going (a container, another engineer's unshare) keeps copies of those
// mounts and their loop devices, and the leak checks would then fail for reasons that are not
// zgolden's. The plugin runs as a child, so it shares the namespace; no Docker engine is needed,
// the tests speak the plugin protocol themselves.
func TestMain(m *testing.M) {
	if os.Geteuid() == 0 && os.Getenv(privateNSEnv) == "" {
		if err := exec.Command("unshare", "--mount", "--propagation", "private", "true").Run(); err == nil {
			args := append([]string{"--mount", "--propagation", "private", os.Args[0]}, os.Args[1:]...)
			cmd := exec.Command("unshare", args...)
			cmd.Env = append(os.Environ(), privateNSEnv+"=1")
			cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
			err := cmd.Run()
			var exitErr *exec.ExitError
			if errors.As(err, &exitErr) {
				os.Exit(exitErr.ExitCode())
			}
			if err != nil {
				fmt.Fprintf(os.Stderr, "could not re-run the tests in a private mount namespace: %v\n", err)
				os.Exit(1)
			}
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "unshare --mount is not available: running in the host's mount namespace")
	}
	os.Exit(m.Run())
}
