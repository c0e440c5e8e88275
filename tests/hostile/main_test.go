package hostile

import (
	"fmt"
	"net"
	"os"
	"testing"
	"time"
)

// dialEnv makes the test binary a tiny client instead: it dials the unix socket named in it and
// reports, for TestSocketsRefuseOtherUsers, which runs it as an unprivileged user.
const dialEnv = "ZGOLDEN_HOSTILE_DIAL"

func TestMain(m *testing.M) {
	if path := os.Getenv(dialEnv); path != "" {
		c, err := net.DialTimeout("unix", path, 5*time.Second)
		if err != nil {
			fmt.Println("dial refused:", err)
			os.Exit(3)
		}
		c.Close()
		fmt.Println("dial succeeded")
		os.Exit(0)
	}
	code := m.Run()
	if n := tried.Load(); n > 0 {
		fmt.Printf("hostile: %d hostile inputs tried in all\n", n)
	}
	os.Exit(code)
}
