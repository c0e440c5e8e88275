package reflinkstore_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"testing"

	"github.com/zgolden/zgolden/reflinkstore"
)

const (
	privateNSEnv = "ZGOLDEN_TEST_PRIVATE_MOUNT_NS"
	openRootEnv  = "ZGOLDEN_TEST_OPEN_ROOT" // see TestSecondProcessRefused
)

// openRootAndExit is the second process of TestSecondProcessRefused: it opens the store at root,
// prints the error, and exits 3 if the store refused it, 0 if it opened.
func openRootAndExit(root string) {
	_, err := reflinkstore.New(context.Background(), reflinkstore.Config{Root: root, StoreSize: 1 << 30, DefaultSize: 1 << 30})
	if err != nil {
		fmt.Println(err)
		os.Exit(3)
	}
	os.Exit(0)
}

// TestMain re-runs the tests in a private mount namespace when it can. Every mount namespace
// created on the host while a test has something mounted (a container, a service with a private
// /tmp, another engineer's unshare) keeps a copy of that mount, and with it the loop device and
// the image, until it exits: the test's own unmount cannot release them, and its leak checks
// fail for reasons that are not the store's. In a private namespace the tests' mounts are
// invisible to everyone else, and die with the test process even if it crashes. Loop devices
// are not namespaced, so the leak checks still see every one.
func TestMain(m *testing.M) {
	if root := os.Getenv(openRootEnv); root != "" {
		openRootAndExit(root)
	}
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
		fmt.Fprintln(os.Stderr, "unshare --mount is not available: running in the host's mount namespace, where other namespaces can hold copies of the tests' mounts")
	}
	os.Exit(m.Run())
}
