// Package harness gives zgolden's integration tests real systems: root and tool gating that skips
// with a reason, loop-backed filesystems, per-test ZFS datasets in the guest's pool, the real
// Docker engine with locally imported images, and the plugin as a separate process.
package harness

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/zgolden/zgolden/internal/recordfile"
)

// RequireRoot skips the test, saying why, unless it runs as root outside -short mode.
func RequireRoot(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("integration test: skipped in -short mode (make test-unit); run make test-host or make test")
	}
	if os.Geteuid() != 0 {
		t.Skip("integration test: needs root for loop devices, mounts and block devices; run as root (make test-host)")
	}
}

// RequireTools skips the test, naming the missing tool and its package, unless all are installed.
func RequireTools(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("integration test: %s is not installed (run tests/setup/host-deps.sh)", tool)
		}
	}
}

// InGuest reports whether the tests run inside the qemu ZFS guest.
func InGuest() bool { return os.Getenv("ZGOLDEN_IN_GUEST") == "1" }

// ID returns a short random identifier for names that must not collide between tests.
func ID() string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// Run runs an argv command and fails the test with its output if it fails.
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := Output(name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

// Output runs an argv command with a generous bound and returns its combined output.
func Output(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	var buf bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = &buf, &buf
	err := cmd.Run()
	return buf.String(), err
}

// LoopFS makes a sparse image of size bytes in a temporary directory, formats it with fstype
// ("xfs" with reflink, or "btrfs"), loop-mounts it and returns the mountpoint. It is unmounted
// (which detaches the loop device) and deleted when the test ends, even when it fails.
func LoopFS(t testing.TB, fstype string, size int64) string {
	t.Helper()
	RequireRoot(t)
	dir := t.TempDir()
	img := filepath.Join(dir, fstype+".img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	switch fstype {
	case "xfs":
		RequireTools(t, "mkfs.xfs")
		Run(t, "mkfs.xfs", "-q", "-m", "reflink=1", img)
	case "btrfs":
		RequireTools(t, "mkfs.btrfs")
		Run(t, "mkfs.btrfs", "-q", img)
	default:
		t.Fatalf("LoopFS: unsupported filesystem %q", fstype)
	}
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	Run(t, "mount", "-o", "loop", img, mnt)
	t.Cleanup(func() {
		if out, err := Output("umount", mnt); err != nil {
			t.Errorf("cleanup: umount %s: %v\n%s", mnt, err, out)
		}
	})
	return mnt
}

// ZFSParent returns a fresh dataset name under the guest's test pool for this test, which the
// test's code may create, and destroys it (recursively) when the test ends. Outside the guest, or
// without the zfs tools and module, the test is skipped with the reason.
func ZFSParent(t testing.TB) string {
	t.Helper()
	parent := RequireZFS(t) + "/t" + ID()
	t.Cleanup(func() {
		// Give udev a moment to let go of zvols it is still probing, then destroy.
		for i := 0; i < 20; i++ {
			out, err := Output("zfs", "destroy", "-r", parent)
			if err == nil || strings.Contains(out, "does not exist") {
				return
			}
			if i == 19 {
				t.Errorf("cleanup: zfs destroy -r %s: %v\n%s", parent, err, out)
			}
			time.Sleep(250 * time.Millisecond)
		}
	})
	return parent
}

// RequireZFS skips the test, saying why, unless a real ZFS test pool is available, and returns
// the pool's name.
func RequireZFS(t testing.TB) string {
	t.Helper()
	RequireRoot(t)
	pool := os.Getenv("ZGOLDEN_TEST_ZPOOL")
	if pool == "" {
		t.Skip("ZFS test: ZGOLDEN_TEST_ZPOOL is not set; these run in the qemu guest with the real zfs module (make test-vm)")
	}
	RequireTools(t, "zfs", "zpool")
	if _, err := os.Stat("/dev/zfs"); err != nil {
		t.Skip("ZFS test: /dev/zfs is missing (no zfs kernel module)")
	}
	return pool
}

// ReflinkUnlinked waits, up to a minute, until no removed volume's image is left under the
// reflink store directory store: Remove renames an image to .tmp-removed.NAME-NS.img and unlinks
// it after returning (reflinkstore's Remove). Inventories call it first, so one still there
// after the wait is listed, as the leak it then is.
func ReflinkUnlinked(t testing.TB, store string) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		matches, err := filepath.Glob(filepath.Join(store, "volumes", ".tmp-removed.*"))
		if err != nil {
			t.Fatal(err)
		}
		if len(matches) == 0 {
			return
		}
	}
}

// ReflinkKept returns the images under the reflink store directory store whose loop device is
// mounted only at kept mounts (reflinkstore's kept.go, WORKDIR/kept-INO): volumes Docker has
// unmounted, whose XFS the store keeps mounted until their Remove. Their loop devices are
// expected in an inventory. Read with losetup and findmnt, not xfsutil, as ReflinkInventory is.
func ReflinkKept(t testing.TB, store string) map[string]bool {
	out := map[string]bool{}
	for img := range reflinkKept(t, store, "volumes") {
		out[img] = true
	}
	return out
}

// reflinkKept maps each image under the store's directories dirs whose loop device is mounted
// only at kept mounts to those mounts.
func reflinkKept(t testing.TB, store string, dirs ...string) map[string][]string {
	t.Helper()
	targets := map[string][]string{}
	for _, l := range strings.Split(Run(t, "findmnt", "-rn", "-o", "SOURCE,TARGET"), "\n") {
		if f := strings.Fields(l); len(f) == 2 {
			targets[f[0]] = append(targets[f[0]], f[1])
		}
	}
	out := map[string][]string{}
	for _, l := range strings.Split(Run(t, "losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"), "\n") {
		f := strings.Fields(l) // a deleted file has a third field, " (deleted)": never kept
		in := false
		for _, d := range dirs {
			in = in || len(f) == 2 && strings.HasPrefix(f[1], filepath.Join(store, d)+"/")
		}
		if !in || len(targets[f[0]]) == 0 {
			continue
		}
		kept := true
		for _, tg := range targets[f[0]] {
			kept = kept && strings.HasPrefix(filepath.Base(tg), "kept-")
		}
		if kept {
			out[f[1]] = targets[f[0]]
		}
	}
	return out
}

// UnmountReflinkStore unmounts the reflink store file's filesystem at ROOT/store once the plugin
// has stopped, for a test's cleanup, and reports a failure but "not mounted". A plugin killed
// with SIGKILL leaves its kept mounts (reflinkstore's kept.go: volumes Docker unmounted, and
// spares), which hold the store busy; they are unmounted first. A mount anywhere else of an
// image in the store is left, and makes the store's unmount fail, as the leak it is.
func UnmountReflinkStore(t testing.TB, root string) {
	t.Helper()
	store := filepath.Join(root, "store")
	for _, mounts := range reflinkKept(t, store, "volumes", "spares") {
		for _, m := range mounts {
			if out, err := Output("umount", m); err != nil {
				t.Errorf("cleanup: umount the kept mount %s: %v\n%s", m, err, out)
			}
		}
	}
	if out, err := Output("umount", store); err != nil && !strings.Contains(out, "not mounted") {
		t.Errorf("cleanup: umount the store: %v\n%s", err, out)
	}
}

// DefaultRecordDir is zgolden serve's default --record-dir, where the suites' plugins record
// claims and removals.
const DefaultRecordDir = "/var/lib/zgolden/zfs-records"

// ZFSInventory lists every dataset and snapshot under parent except parent itself, sorted.
//
// A removed volume waits until the plugin's worker destroys it: in PARENT/trash (zfsstore's
// trash.go), or in place with a removal record under the record directory (removal.go; the
// record directories are recordDirs, DefaultRecordDir when none are given). So the inventory
// first waits, up to a minute, for the trash to empty and the removal and claim records to go:
// what is still there after that is listed, as the leak it then is. The trash and spare
// containers are not; the spares are (WithoutSpares).
func ZFSInventory(t testing.TB, parent string, recordDirs ...string) []string {
	t.Helper()
	if len(recordDirs) == 0 {
		recordDirs = []string{DefaultRecordDir}
	}
	trash := parent + "/trash"
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(100 * time.Millisecond) {
		// The records first, then the listing: a record is deleted only after its destroy, so
		// none before the listing means the listing shows no recorded removal's dataset.
		// A claim record goes once its spare is renamed to PARENT/vol/NAME (zfsstore's
		// spares.go), so none left means every claimed volume is under its own name.
		pending := false
		for _, dir := range recordDirs {
			// zfsstore.RecordFile's path; zfsstore's own tests use this package, so it cannot
			// be imported here.
			keys, _ := recordfile.ReadKeys(filepath.Join(dir, strings.ReplaceAll(parent, "/", "%"), "records"))
			for _, k := range keys {
				pending = pending || strings.HasPrefix(k, "removal/") || strings.HasPrefix(k, "claim/")
			}
		}
		out := Run(t, "zfs", "list", "-H", "-r", "-t", "all", "-o", "name", "-s", "name", parent)
		var names []string
		for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
			pending = pending || strings.HasPrefix(l, trash+"/")
			if l != "" && l != parent && l != trash && l != parent+"/spare" {
				names = append(names, l)
			}
		}
		if !pending || time.Now().After(deadline) {
			return names
		}
	}
}

// WithoutSpares returns inv, an inventory (ZFSInventory of parent, or ReflinkInventory of the
// store directory), without the warm spares (--spares) and their loop devices. The spare worker
// makes and retires spares on its own, after an import, a promotion or a Create that claimed one,
// so a suite that compares inventories across its own requests compares the rest, and checks the
// spares apart (SparesGone). where is the parent dataset or the store directory.
func WithoutSpares(inv []string, where string) []string {
	return slices.DeleteFunc(slices.Clone(inv), func(e string) bool { return isSpare(e, where) })
}

func isSpare(e, where string) bool {
	if !strings.HasPrefix(where, "/") { // a ZFS parent: PARENT/spare/ID
		return strings.HasPrefix(e, where+"/spare/")
	}
	return strings.HasPrefix(e, "spares/") || strings.HasPrefix(e, "loop:"+where+"/spares/")
}

// SparesGone waits, up to two minutes, until inventory (of parent or store directory where)
// lists no spare, for a suite that removed every golden: the worker retires the spares of a
// project that is gone, and one still there after the wait is a leak.
func SparesGone(t testing.TB, where string, inventory func() []string) {
	t.Helper()
	var left []string
	for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		left = slices.DeleteFunc(inventory(), func(e string) bool { return !isSpare(e, where) })
		if len(left) == 0 {
			return
		}
	}
	t.Errorf("every golden is removed, and after two minutes spares are left: %v", left)
}

// ReflinkInventory lists what the reflink store in directory store holds: its files and
// directories (under the top-level directories tops only, when given), relative to store, and
// "loop:FILE" for each loop device backed by a file under store, with " (deleted)" when that
// file was unlinked. It waits for removed images first (ReflinkUnlinked). With ZFSInventory it
// is how every suite sees what a backend holds.
func ReflinkInventory(t testing.TB, store string, tops ...string) []string {
	t.Helper()
	ReflinkUnlinked(t, store)
	if len(tops) == 0 {
		tops = []string{"."}
	}
	var out []string
	for _, top := range tops {
		_ = filepath.WalkDir(filepath.Join(store, top), func(p string, d os.DirEntry, err error) error {
			if err == nil {
				rel, _ := filepath.Rel(store, p)
				out = append(out, rel)
			}
			return nil
		})
	}
	// losetup, not xfsutil: xfsutil's own tests use this package. BACK-FILE ends in
	// " (deleted)" once the file is unlinked.
	lo := Run(t, "losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE")
	for _, l := range strings.Split(lo, "\n") {
		if f := strings.Fields(l); len(f) >= 2 && strings.HasPrefix(f[1], store+"/") {
			out = append(out, "loop:"+strings.Join(f[1:], " "))
		}
	}
	slices.Sort(out)
	return out
}

// SyncEvent is one internal event of a dataset in its pool's history: the transaction group it
// synced in, the operation (clone, set, inherit, rename...) and what followed the dataset's name.
type SyncEvent struct {
	Txg        int64
	Op, Detail string
}

var historyLine = regexp.MustCompile(`\[txg:(\d+)\] (\S+) (\S+) \(\d+\)\s*(.*)$`)

// SyncEvents returns ds's internal events from zpool history -i, oldest first. Two events with
// one Txg were one transaction group; the sync tasks of one transaction group are never two
// waits, which is what tests of the number of waits a call costs read from it.
func SyncEvents(t testing.TB, ds string) []SyncEvent {
	t.Helper()
	pool, _, _ := strings.Cut(ds, "/")
	var evs []SyncEvent
	for _, line := range strings.Split(Run(t, "zpool", "history", "-i", pool), "\n") {
		m := historyLine.FindStringSubmatch(line)
		if m == nil || m[3] != ds {
			continue
		}
		txg, _ := strconv.ParseInt(m[1], 10, 64)
		evs = append(evs, SyncEvent{Txg: txg, Op: m[2], Detail: m[4]})
	}
	return evs
}
