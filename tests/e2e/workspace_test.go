package e2e

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/zgolden/zgolden/tests/harness"
)

// makeRepo writes a git repository with commits commits and a few hundred files, in one
// `git fast-import` (hundreds of git commands would take minutes under emulation).
func makeRepo(t *testing.T, dir string, commits int) {
	t.Helper()
	harness.Run(t, "git", "init", "-q", "-b", "main", dir)
	var stream bytes.Buffer
	for c := 1; c <= commits; c++ {
		fmt.Fprintf(&stream, "commit refs/heads/main\nmark :%d\ncommitter zgolden <zgolden@example.invalid> %d +0000\n", c, 1700000000+c)
		msg := fmt.Sprintf("commit %d", c)
		fmt.Fprintf(&stream, "data %d\n%s\n", len(msg), msg)
		if c > 1 {
			fmt.Fprintf(&stream, "from :%d\n", c-1)
		}
		for f := 0; f < 2; f++ { // each commit adds or rewrites two files
			body := strings.Repeat(fmt.Sprintf("line of file %d in commit %d\n", (c*2+f)%400, c), 20)
			fmt.Fprintf(&stream, "M 100644 inline src/pkg%02d/file%03d.txt\ndata %d\n%s\n", (c+f)%23, (c*2+f)%400, len(body), body)
		}
	}
	cmd := exec.Command("git", "-C", dir, "fast-import", "--quiet")
	cmd.Stdin = &stream
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("git fast-import: %v\n%s", err, out)
	}
	harness.Run(t, "git", "-C", dir, "checkout", "-q", "-f", "main")
}

// TestGoldenWorkspace is issue 8's proof: a git checkout imported as a type=fs golden, two
// volumes cloned from it, git used inside containers on both, writes isolated, little written
// per clone, and nothing left after removal. On ZFS the volumes are filesystem-dataset clones;
// on the reflink store they are images.
func TestGoldenWorkspace(t *testing.T) {
	b := startBackend(t)
	const commits = 300
	repo := t.TempDir()
	makeRepo(t, repo, commits)
	if out, err := b.p.Admin(t, "golden", "import", repo, "--project", "ws", "--type", "fs"); err != nil {
		t.Fatalf("golden import --type fs: %v\n%s", err, out)
	}
	ls, err := b.p.Admin(t, "golden", "ls")
	if err != nil || !strings.Contains(ls, "ws") || !strings.Contains(ls, "fs") {
		t.Fatalf("golden ls does not show the fs golden: %v\n%s", err, ls)
	}
	b.volume(t, "zg-wa", "golden=ws", "type=fs")
	b.volume(t, "zg-wb", "golden=ws", "type=fs")
	git := func(vol string, args ...string) string {
		t.Helper()
		run := append([]string{"run", "--rm", "--network", "none", "-v", vol + ":/ws", "-w", "/ws", harness.DindImage(),
			"git", "-c", "safe.directory=*", "-c", "user.name=agent", "-c", "user.email=agent@example.invalid"}, args...)
		return b.docker(t, run...)
	}
	for _, v := range []string{"zg-wa", "zg-wb"} {
		if st := git(v, "status", "--porcelain"); st != "" {
			t.Fatalf("%s: git status in a fresh clone is not clean:\n%s", v, st)
		}
		if n := git(v, "rev-list", "--count", "HEAD"); n != strconv.Itoa(commits) {
			t.Fatalf("%s: git log has %s commits, want %d", v, n, commits)
		}
	}
	git("zg-wa", "commit", "-q", "--allow-empty", "-m", "agent a was here")
	if log := git("zg-wb", "log", "--oneline", "-3"); strings.Contains(log, "agent a was here") {
		t.Fatalf("a commit in volume zg-wa shows in zg-wb:\n%s", log)
	}
	if n := git("zg-wa", "rev-list", "--count", "HEAD"); n != strconv.Itoa(commits+1) {
		t.Fatalf("zg-wa has %s commits after its commit, want %d", n, commits+1)
	}
	// ZFS accounts written space when a transaction group syncs (every few seconds), so wait for
	// the commit to be accounted before reading it.
	in := b.inspect(t, "zg-wa")
	for deadline := time.Now().Add(30 * time.Second); b.pool != "" && in.Status["written_bytes"] == float64(0) && time.Now().Before(deadline); {
		time.Sleep(time.Second)
		in = b.inspect(t, "zg-wa")
	}
	written, _ := in.Status["written_bytes"].(float64)
	logical, _ := in.Status["logical_bytes"].(float64)
	if in.Status["type"] != "fs" || written <= 0 && b.pool != "" {
		t.Fatalf("inspect zg-wa = %+v", in.Status)
	}
	// A clone shares the whole repository with the golden; a commit writes kilobytes.
	if written > 16<<20 {
		t.Fatalf("zg-wa wrote %.0f bytes after a clone and one commit (logical %.0f): the clone is not sharing", written, logical)
	}
	t.Logf("after clone + commit: written %.0f bytes, logical %.0f bytes", written, logical)

	b.docker(t, "volume", "rm", "zg-wa", "zg-wb")
	if left := b.leaks(t); len(left) > 0 && !onlyGoldens(left) {
		t.Fatalf("left behind: %v", left)
	}
	if _, err := os.Stat(repo); err != nil {
		t.Fatalf("the imported source was touched: %v", err)
	}
}
