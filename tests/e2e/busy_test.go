package e2e

import (
	"fmt"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/zgolden/zgolden/tests/harness"
)

// writerScript writes like a session's build: a 64 MiB file of random data (compression and
// ZFS's zero detection would turn zeros into no I/O), copied over itself in a loop with an fsync
// each time, printing a line per copy. Every copy dirties the pool, so its transaction groups
// grow as they do under many sessions' builds.
const writerScript = `head -c 67108864 /dev/urandom > /data/seed && while :; do dd if=/data/seed of=/data/out bs=1M conv=fsync 2>/dev/null && echo wrote; done`

// TestBusyPoolThroughDocker is the busy pool as Docker sees it: three session volumes write
// continuously while new sessions come and go through the docker command line. On ZFS every
// admin command then waits for the syncing transaction group; before the warm spares, every
// `docker volume create` under this kind of load failed with Docker's "context deadline
// exceeded". Here a Create that has a spare ready must succeed, and so must the session's
// container (Mount, a 20 MB write, Unmount) and its `docker volume rm`. A Create beyond the
// spares may run out of time on a release and load where a clone takes minutes (zfs 2.1 in the
// emulated guest), but then it must fail with the plugin's own explanation, before Docker gives
// up, and leave nothing. The times are logged, not asserted: `make bench` owns the figures.
func TestBusyPoolThroughDocker(t *testing.T) {
	// Registered first, so it runs last: after the plugin's whole log, which a failure prints,
	// the lines that say where its Removes stood, where a report of only the output's end
	// still shows them.
	var b *backend
	t.Cleanup(func() {
		if t.Failed() && b != nil {
			t.Logf("the plugin's removals, again after its log:\n%s", grepLines(b.p.Logs(), "removal recorded", "removed while", "destroyed a removed volume", "could not destroy", "closing a removed volume's device"))
		}
	})
	b = startBackend(t)
	b.importGolden(t, "prj_busy")
	// The install's default, two spares, made while the pool is idle, as they would be between
	// bursts.
	b.waitSpares(t, "prj_busy", 2)

	// Volumes this test has made and not yet removed, removed at its end if it fails first. Only
	// those: a `docker volume rm -f` of a name Docker does not know asks every plugin it has
	// ever seen, and waits out the retries of each one gone, about 45 s.
	left := map[string]bool{}
	t.Cleanup(func() {
		for v := range left {
			_, _ = harness.Output("docker", "volume", "rm", "-f", b.n(v))
		}
	})
	create := func(v string, opts ...string) (string, time.Duration, error) {
		args := []string{"volume", "create", "--driver", b.p.Name}
		for _, o := range opts {
			args = append(args, "-o", o)
		}
		start := time.Now()
		out, err := harness.Output("docker", append(args, b.n(v))...)
		if err == nil {
			left[v] = true
		}
		return strings.TrimSpace(out), time.Since(start), err
	}
	remove := func(vs ...string) {
		t.Helper()
		b.docker(t, append([]string{"volume", "rm"}, vs...)...)
		for _, v := range vs {
			delete(left, v)
		}
	}

	// The writers' volumes are made before any of them writes: a fresh volume is formatted
	// with mkfs.xfs, whose writes queue behind a busy pool's for minutes (zfs 2.1 in the guest),
	// and a session's volume comes from a golden, not from mkfs.
	writers := []string{"zg-w1", "zg-w2", "zg-w3"}
	for _, w := range writers {
		if out, _, err := create(w, "size=2G"); err != nil {
			t.Fatalf("docker volume create %s: %v\n%s", w, err, out)
		}
	}
	for _, w := range writers {
		b.container(t, w+"c", "-v", w+":/data", harness.BusyboxImage(), "sh", "-c", writerScript)
	}
	copies := func() (n []int) {
		for _, w := range writers {
			n = append(n, strings.Count(b.docker(t, "logs", w+"c"), "wrote"))
		}
		return n
	}
	// Every writer past its first copy: the load is on before the first timed Create.
	for deadline := time.Now().Add(5 * time.Minute); ; time.Sleep(time.Second) {
		if n := copies(); !slices.Contains(n, 0) {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("the writers did not finish a first copy in 5 minutes (copies %v)", n)
		}
		for _, w := range writers {
			if running := b.docker(t, "inspect", "-f", "{{.State.Running}}", w+"c"); running != "true" {
				logs, _ := harness.Output("docker", "logs", b.n(w+"c"))
				t.Fatalf("writer %s stopped: %s", w, logs)
			}
		}
	}
	before := copies()
	txgs := b.txgSync(t)

	logTook := func(what string, took time.Duration) {
		t.Logf("under load: %s took %v", what, took.Round(time.Millisecond))
	}
	sessions := []string{"zg-s1", "zg-s2"}
	for _, s := range sessions {
		out, took, err := create(s, "golden=prj_busy")
		logTook("docker volume create of "+s+" (the plugin's Create: "+handlerTook(b.p.Logs(), "create", b.n(s))+")", took)
		if err != nil {
			t.Fatalf("docker volume create %s with a spare ready, under load: %v\n%s", s, err, out)
		}
		if !claimed(b.p.Logs(), b.n(s)) {
			t.Errorf("docker volume create %s under load did not claim one of the ready spares", s)
		}
	}
	for _, s := range sessions {
		// The session: the golden is there, it writes 20 MB and stops, so Docker mounts and then
		// unmounts a volume that has written. Its file is fsynced alone: sync(1) would also wait
		// for every writer's dirty data. It prints the kernel's uptime before and after its
		// write, which the container shares with this test, so the log can say which part of a
		// session's time is Docker's start (Mount included), the write, and Docker's stop
		// (Unmount included).
		script := `cut -d' ' -f1 /proc/uptime && cat /var/lib/docker/README && cut -d' ' -f1 /proc/uptime && ` +
			`head -c 20971520 /dev/urandom | dd of=/var/lib/docker/session bs=1M conv=fsync 2>/dev/null && cut -d' ' -f1 /proc/uptime`
		start, upStart := time.Now(), uptime(t)
		out, err := harness.Output("docker", "run", "--rm", "--network", "none", "-v", b.n(s)+":/var/lib/docker", harness.BusyboxImage(), "sh", "-c", script)
		took, upEnd := time.Since(start), uptime(t)
		lines := strings.Fields(out)
		if err != nil || len(lines) != 5 || lines[1]+" "+lines[2] != "golden content" {
			t.Fatalf("a session's container on %s under load: %v\n%s", s, err, out)
		}
		var marks []float64
		for _, l := range []string{lines[0], lines[3], lines[4]} {
			v, perr := strconv.ParseFloat(l, 64)
			if perr != nil {
				t.Fatalf("a session's container on %s printed %q for the uptime:\n%s", s, l, out)
			}
			marks = append(marks, v)
		}
		logTook("docker run of a session on "+s, took)
		logs := b.p.Logs()
		t.Logf("under load: that session: %.2f s from docker run to its first command (start, and the plugin's Mount: %s), "+
			"%.2f s to read the README, %.2f s to write and fsync 20 MB, %.2f s from its exit to docker run's (stop, and the plugin's Unmount: %s)",
			marks[0]-upStart, handlerTook(logs, "mount", b.n(s)), marks[1]-marks[0], marks[2]-marks[1], upEnd-marks[2], handlerTook(logs, "unmount", b.n(s)))
	}
	for _, s := range sessions {
		start := time.Now()
		remove(s)
		logTook("docker volume rm of "+s+" (the plugin's Remove: "+handlerTook(b.p.Logs(), "remove", b.n(s))+")", time.Since(start))
	}

	// Beyond the spares: it waits for the spare being made or clones its own.
	third := b.n("zg-s3")
	out, took, err := create("zg-s3", "golden=prj_busy")
	logTook("docker volume create of zg-s3, beyond the spares", took)
	if err != nil {
		// The plugin's deadline is inside Docker's 2 minutes, so the error is the plugin's, with
		// its reason, and not Docker's bare "context deadline exceeded".
		if !strings.Contains(out, "nothing was left behind") || !strings.Contains(out, "transaction group") {
			t.Fatalf("docker volume create beyond the spares failed after %v without the plugin's reason (Docker gave up first?):\n%s", took, out)
		}
		t.Logf("the Create beyond the spares ran out of time, as it may on this release and load: %s", out)
		if ls := b.docker(t, "volume", "ls", "-q", "--filter", "driver="+b.p.Name); strings.Contains(ls, third) {
			t.Fatalf("the failed Create of %s is still listed by Docker:\n%s", third, ls)
		}
	} else if out != third {
		t.Fatalf("docker volume create zg-s3 printed %q", out)
	}
	after := copies()
	t.Logf("pool under load: last txg sync %s before the Creates, %s after; writer copies %v before the Creates, %v after",
		txgs, b.txgSync(t), before, after)
	for i := range writers {
		if after[i] <= before[i] {
			t.Errorf("writer %s made no copy while the sessions came and went (%d before, %d after): the pool was not under load", writers[i], before[i], after[i])
		}
	}

	// The load stops; everything goes, and nothing is left but the golden.
	for _, w := range writers {
		b.docker(t, "rm", "-f", w+"c")
	}
	if err == nil {
		remove("zg-s3")
	}
	remove(writers...)
	// The datasets go in the background, one at a time, after the Removes returned (zfsstore's
	// removal.go): the kept XFS is unmounted, which writes back what it holds and closes the
	// zvol, and the zvol is destroyed, and on this pool each of those waits for transaction
	// groups full of the writers' data (a guest run logged 33 s for one unmount). One CI run,
	// with two guests of one vCPU each, failed this test and stopped its plugin with five
	// removed volumes still to be destroyed, while the inventory waits only a minute for them.
	// So the test waits for the plugin to report none pending (10 minutes at most), logs how
	// long that took, and only then takes the inventory.
	removed := time.Now()
	for deadline := removed.Add(10 * time.Minute); ; time.Sleep(time.Second) {
		st, err := b.status(t)
		if err == nil && st.RemovedPending == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("10 minutes after the last Remove, %d removed volumes are still to be destroyed (%v)", st.RemovedPending, err)
		}
	}
	t.Logf("the removed volumes were destroyed %v after the writers' Remove returned", time.Since(removed).Round(time.Millisecond))
	if l := grepLines(b.p.Logs(), "destroyed a removed volume", "closing a removed volume's device"); l != "" {
		t.Logf("the plugin's log of it:\n%s", l)
	}
	if left := b.leaks(t); len(left) > 0 && !onlyGoldens(left) {
		t.Fatalf("left behind after the busy pool's sessions were removed: %v", left)
	}
	assertNoMounts(t, b.p.MountRoot)
}

// txgSync is what zgolden status says of the pool's last transaction group syncs, for the log;
// the reflink store has none.
func (b *backend) txgSync(t *testing.T) string {
	t.Helper()
	st, err := b.status(t)
	if err != nil {
		t.Fatal(err)
	}
	if st.ZFSStatus == nil || st.TxgSyncLastSeconds == nil || st.TxgSyncMax10Seconds == nil {
		return "(none)"
	}
	return fmt.Sprintf("%.2fs (longest of the last ten %.2fs)", *st.TxgSyncLastSeconds, *st.TxgSyncMax10Seconds)
}

// uptime is the kernel's uptime in seconds, the clock a container can read too.
func uptime(t *testing.T) float64 {
	t.Helper()
	b, err := os.ReadFile("/proc/uptime")
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		t.Fatalf("/proc/uptime: %q", b)
	}
	v, err := strconv.ParseFloat(f[0], 64)
	if err != nil {
		t.Fatalf("/proc/uptime: %v", err)
	}
	return v
}

// handlerTook is what the plugin's log says its handler took for call on volume: the part of a
// Docker command's time that is the plugin's own.
func handlerTook(logs, call, volume string) string {
	line := regexp.MustCompile(`msg="request done".* call=` + call + ` (?:.* )?took=(\S+) (?:.* )?volume=` + regexp.QuoteMeta(volume) + `( |$)`)
	for _, l := range strings.Split(logs, "\n") {
		if m := line.FindStringSubmatch(l); m != nil {
			return m[1]
		}
	}
	return "not in its log"
}

// grepLines is the lines of logs that hold any of subs.
func grepLines(logs string, subs ...string) string {
	var out []string
	for _, l := range strings.Split(logs, "\n") {
		if slices.ContainsFunc(subs, func(sub string) bool { return strings.Contains(l, sub) }) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
