// Package zfsutil is the only place zgolden runs the zfs and zpool commands; it turns their failures
// into sentinel errors once, so callers use errors.Is instead of matching stderr.
package zfsutil

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/zgolden/zgolden/internal/command"
	"github.com/zgolden/zgolden/internal/retry"
)

// Sentinel errors for the failures callers act on.
var (
	ErrNotFound      = errors.New("dataset does not exist")
	ErrExists        = errors.New("dataset already exists")
	ErrBusy          = errors.New("dataset is busy")
	ErrNoSpace       = errors.New("out of space in the pool")
	ErrHasDependents = errors.New("dataset has dependent clones or children")
	ErrHeld          = errors.New("snapshot has a user hold")
)

// stderr fragments, as printed by OpenZFS 2.x, mapped to the sentinel errors above.
var classes = []struct {
	fragment string
	kind     error
}{
	{"dataset does not exist", ErrNotFound},
	{"could not find any snapshots", ErrNotFound},
	{"no such pool", ErrNotFound},
	{"dataset already exists", ErrExists},
	{"dataset is busy", ErrBusy},
	{"pool or dataset is busy", ErrBusy},
	{"out of space", ErrNoSpace},
	{"quota exceeded", ErrNoSpace}, // zfs receive on 2.1 into a parent at its quota: "space quota exceeded"
	{"insufficient replicas", ErrNoSpace},
	{"dependent clones", ErrHasDependents},
	{"being held", ErrHeld}, // zfs destroy of a snapshot with a user hold (zfs hold)
	{"has children", ErrHasDependents},
}

func classify(err error) error {
	if err == nil {
		return nil
	}
	var cerr *command.Error
	if !errors.As(err, &cerr) {
		return err
	}
	low := strings.ToLower(cerr.Stderr)
	for _, c := range classes {
		if strings.Contains(low, c.fragment) {
			cerr.Kind = c.kind
			break
		}
	}
	return cerr
}

// ZFS runs zfs and zpool. Its zero value is not usable; call New.
type ZFS struct {
	log *logrus.Entry

	// zvols maps zd device names to what their BLKZNAME said when last opened (see findZvol);
	// Destroy and Rename forget the datasets they change.
	zvMu      sync.Mutex
	zvols     map[string]zvolSeen
	rescanned time.Time // the last findZvol that opened every device
}

// New returns a runner that logs each command at debug level.
func New(log *logrus.Entry) *ZFS {
	return &ZFS{log: log, zvols: map[string]zvolSeen{}}
}

// CommandTimeout bounds every zfs command whose context has no earlier deadline. A sync task
// waits for the transaction group that carries it; under write load that is tens of seconds
// (docs/design-facts.md, "Transaction groups"), and only a pool that has stopped syncing takes
// longer than this.
const CommandTimeout = 5 * time.Minute

func (z *ZFS) run(ctx context.Context, args ...string) ([]byte, error) {
	z.log.WithField("argv", args).Debug("zfs")
	ctx, cancel := context.WithTimeout(ctx, CommandTimeout)
	defer cancel()
	out, err := command.Run(ctx, "zfs", args...)
	return out, classify(err)
}

// zpool runs a read-only zpool command, bounded as run bounds zfs.
func (z *ZFS) zpool(ctx context.Context, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, CommandTimeout)
	defer cancel()
	return command.Run(ctx, "zpool", args...)
}

// Props is a set of ZFS properties. User properties (zgolden:*) are the plugin's source of truth.
type Props map[string]string

func (p Props) args() []string {
	keys := make([]string, 0, len(p))
	for k := range p {
		keys = append(keys, k)
	}
	sort.Strings(keys) // stable argv makes logs and tests comparable
	args := make([]string, 0, 2*len(keys))
	for _, k := range keys {
		args = append(args, "-o", k+"="+p[k])
	}
	return args
}

// CreateVolume makes a sparse zvol: refreservation=none is what `zfs create -s` sets, and it keeps
// hundreds of 100 GB volumes from reserving space they never write.
func (z *ZFS) CreateVolume(ctx context.Context, name string, size uint64, props Props) error {
	p := Props{"refreservation": "none"}
	for k, v := range props {
		p[k] = v
	}
	args := append([]string{"create", "-V", strconv.FormatUint(size, 10)}, p.args()...)
	_, err := z.run(ctx, append(args, name)...)
	return err
}

// CreateFilesystem makes a filesystem dataset.
func (z *ZFS) CreateFilesystem(ctx context.Context, name string, props Props) error {
	args := append([]string{"create"}, props.args()...)
	_, err := z.run(ctx, append(args, name)...)
	return err
}

// Clone clones snapshot into dest with props, in one zfs process and one ioctl. The kernel does it
// in two sync tasks, the clone and then its properties (zfs_ioc_clone: "It would be nice to do
// this atomically"), destroying the clone if the properties fail; a host crash between the two
// transaction groups leaves a clone without zgolden:state=ready, which zfsstore's Load destroys
// as an interrupted Create. The second sync task is about 50 ms of a Create in the emulated
// guest (zfs clone with zgolden's seven properties 228 ms, without them 180 ms).
func (z *ZFS) Clone(ctx context.Context, snapshot, dest string, props Props) error {
	args := append([]string{"clone"}, props.args()...)
	_, err := z.run(ctx, append(args, snapshot, dest)...)
	return err
}

// Snapshot takes ds@snap with props set atomically on the snapshot.
func (z *ZFS) Snapshot(ctx context.Context, snapshot string, props Props) error {
	args := append([]string{"snapshot"}, props.args()...)
	_, err := z.run(ctx, append(args, snapshot)...)
	return err
}

// Destroy destroys one dataset or snapshot. With recursive it also destroys the dataset's own
// snapshots (-r); it never destroys dependent clones (-R), so a golden cannot take volumes with it.
func (z *ZFS) Destroy(ctx context.Context, name string, recursive bool) error {
	defer z.forgetZvols(name)
	args := []string{"destroy"}
	if recursive {
		args = append(args, "-r")
	}
	_, err := z.run(ctx, append(args, name)...)
	return err
}

// Set sets properties on a dataset or snapshot in one command.
func (z *ZFS) Set(ctx context.Context, name string, props Props) error {
	if len(props) == 0 {
		return nil
	}
	args := []string{"set"}
	for _, kv := range props.args() {
		if kv != "-o" {
			args = append(args, kv)
		}
	}
	_, err := z.run(ctx, append(args, name)...)
	return err
}

// Inherit removes a user property from a dataset.
func (z *ZFS) Inherit(ctx context.Context, name, prop string) error {
	_, err := z.run(ctx, "inherit", prop, name)
	return err
}

// Promote makes a clone independent of its origin (one level only).
func (z *ZFS) Promote(ctx context.Context, name string) error {
	_, err := z.run(ctx, "promote", name)
	return err
}

// Rename renames a dataset or a snapshot.
func (z *ZFS) Rename(ctx context.Context, from, to string) error {
	defer z.forgetZvols(from)
	_, err := z.run(ctx, "rename", from, to)
	return err
}

// Exists reports whether a dataset or snapshot exists.
func (z *ZFS) Exists(ctx context.Context, name string) (bool, error) {
	_, err := z.run(ctx, "list", "-H", "-o", "name", name)
	if errors.Is(err, ErrNotFound) {
		return false, nil
	}
	return err == nil, err
}

// Row is one dataset from List: its properties by name ("-" values become "").
type Row map[string]string

// Uint parses a numeric property; missing or "-" is 0.
func (r Row) Uint(prop string) uint64 {
	n, _ := strconv.ParseUint(r[prop], 10, 64)
	return n
}

// List lists root and its descendants of the given types ("volume", "filesystem", "snapshot"),
// with exact (-p) values of props. One zfs process serves the whole tree, so start-up stays one
// command however many volumes exist.
func (z *ZFS) List(ctx context.Context, root string, types []string, props []string) ([]Row, error) {
	return z.list(ctx, []string{"-r"}, root, types, props)
}

// ListChildren is List of root and its direct children only (zfs list -d 1).
func (z *ZFS) ListChildren(ctx context.Context, root string, types []string, props []string) ([]Row, error) {
	return z.list(ctx, []string{"-d", "1"}, root, types, props)
}

func (z *ZFS) list(ctx context.Context, depth []string, root string, types []string, props []string) ([]Row, error) {
	cols := append([]string{"name"}, props...)
	args := slices.Concat([]string{"list", "-H", "-p"}, depth, []string{"-t", strings.Join(types, ","), "-o", strings.Join(cols, ","), root})
	out, err := z.run(ctx, args...)
	if err != nil {
		return nil, err
	}
	var rows []Row
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 64*1024), 4*1024*1024)
	for sc.Scan() {
		f := strings.Split(sc.Text(), "\t")
		if len(f) != len(cols) {
			return nil, fmt.Errorf("zfs list: unexpected line %q", sc.Text())
		}
		row := Row{}
		for i, c := range cols {
			if f[i] != "-" {
				row[c] = f[i]
			}
		}
		rows = append(rows, row)
	}
	return rows, sc.Err()
}

// Get returns props of a single dataset or snapshot.
func (z *ZFS) Get(ctx context.Context, name string, props ...string) (Row, error) {
	out, err := z.run(ctx, "get", "-H", "-p", "-o", "property,value", strings.Join(props, ","), name)
	if err != nil {
		return nil, err
	}
	row := Row{"name": name}
	for _, line := range strings.Split(strings.TrimRight(string(out), "\n"), "\n") {
		k, v, ok := strings.Cut(line, "\t")
		if ok && v != "-" {
			row[k] = v
		}
	}
	return row, nil
}

// SendReceive streams snapshot, whole, into a new dataset dest. The receive is unmounted (-u) and
// is created atomically: dest@snap appears only when the whole stream has arrived, which is what
// lets a racing Create see the old or the new generation only.
func (z *ZFS) SendReceive(ctx context.Context, snapshot, dest string) error {
	sendArgs := []string{"send", snapshot}
	pr, pw := io.Pipe()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	sendErr := make(chan error, 1)
	go func() {
		_, err := command.RunIO(ctx, nil, pw, "zfs", sendArgs...)
		pw.CloseWithError(err)
		sendErr <- err
	}()
	z.log.WithFields(logrus.Fields{"send": sendArgs, "dest": dest}).Debug("zfs send | zfs receive")
	_, recvErr := command.RunIO(ctx, pr, nil, "zfs", "receive", "-u", dest)
	if recvErr != nil {
		cancel()
		pr.CloseWithError(recvErr)
	}
	if err := <-sendErr; err != nil && recvErr == nil {
		return classify(err)
	}
	return classify(recvErr)
}

// Send writes snapshot as a zfs send stream to w: whole, or incremental from the snapshot from
// (which may sit in an origin of snapshot's dataset). Blocks go as they are stored (-c), so a
// compressed pool sends compressed bytes. No properties are sent: the receiver sets its own. A
// stream lasts as long as its bytes do, so it is bounded by ctx alone (not CommandTimeout): the
// caller's context, such as the admin request, kills it.
func (z *ZFS) Send(ctx context.Context, w io.Writer, snapshot, from string) error {
	args := []string{"send", "-c"}
	if from != "" {
		args = append(args, "-i", from)
	}
	args = append(args, snapshot)
	z.log.WithField("argv", args).Debug("zfs send")
	_, err := command.RunIO(ctx, nil, w, "zfs", args...)
	return classify(err)
}

// Receive reads a zfs send stream from r into the new dataset dest, unmounted (-u), with props
// set on it; an incremental stream is received as a clone of origin (-o origin=), whose guid
// ZFS checks against the stream's base. Never -F: nothing local is rolled back or destroyed. The
// receive is resumable (-s): one that fails or is killed mid-stream leaves dest inconsistent,
// invisible to clones, with a receive_resume_token (ResumeToken), and the caller either keeps
// it for a resume or destroys it. A resumed stream (SendResume) goes into the same dest with
// origin "". Bounded by ctx alone, as Send.
func (z *ZFS) Receive(ctx context.Context, r io.Reader, dest string, props Props, origin string) error {
	args := append([]string{"receive", "-u", "-s"}, props.args()...)
	if origin != "" {
		args = append(args, "-o", "origin="+origin)
	}
	args = append(args, dest)
	z.log.WithField("argv", args).Debug("zfs receive")
	_, err := command.RunIO(ctx, r, nil, "zfs", args...)
	return classify(err)
}

// ResumeToken returns the receive_resume_token of dataset: "" when no interrupted resumable
// receive is saved in it.
func (z *ZFS) ResumeToken(ctx context.Context, dataset string) (string, error) {
	row, err := z.Get(ctx, dataset, "receive_resume_token")
	if err != nil {
		return "", err
	}
	if t := row["receive_resume_token"]; t != "-" {
		return t, nil
	}
	return "", nil
}

// ResumeInfo is what a resume token says about the stream it resumes: the sender's snapshot
// (its name and guid) and, for an incremental stream, its base's guid. Guids are decimal, as
// zfs get prints them.
type ResumeInfo struct {
	ToName, ToGUID, FromGUID string
}

// DescribeResumeToken decodes token with a dry run of zfs send -t, which checks the token's
// own checksum: a sender must know which snapshot a token names before it sends anything,
// since the token comes from the other host. The snapshot need not exist any more: the caller
// compares the name and guid with what it holds.
func (z *ZFS) DescribeResumeToken(ctx context.Context, token string) (ResumeInfo, error) {
	ctx, cancel := context.WithTimeout(ctx, CommandTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "zfs", "send", "-n", "-v", "-t", token)
	cmd.WaitDelay = command.KillGrace
	// Releases differ in which stream the token's contents go to: read both. zfs prints them
	// before it looks the snapshot up, so a token whose snapshot is gone or renamed fails here
	// after its contents: those are what the caller needs to say so.
	out, err := cmd.CombinedOutput()
	var info ResumeInfo
	for _, line := range strings.Split(string(out), "\n") {
		key, value, ok := strings.Cut(strings.TrimSpace(line), " = ")
		if !ok {
			continue
		}
		switch key {
		case "toname":
			info.ToName = value
		case "toguid", "fromguid":
			n, err := strconv.ParseUint(strings.TrimPrefix(value, "0x"), 16, 64)
			if err != nil {
				return ResumeInfo{}, fmt.Errorf("resume token: %s %q is not a guid", key, value)
			}
			if key == "toguid" {
				info.ToGUID = strconv.FormatUint(n, 10)
			} else {
				info.FromGUID = strconv.FormatUint(n, 10)
			}
		}
	}
	if info.ToName == "" || info.ToGUID == "" {
		if err != nil {
			return ResumeInfo{}, classify(&command.Error{Argv: cmd.Args, Stderr: string(out), Err: err})
		}
		return ResumeInfo{}, fmt.Errorf("zfs send -nvt printed no toname and toguid for the token:\n%s", out)
	}
	return info, nil
}

// SendResume writes the rest of an interrupted stream, from where the receiver's token says it
// stopped (zfs send -t), to w. The token carries the first send's flags. Bounded by ctx, as Send.
func (z *ZFS) SendResume(ctx context.Context, w io.Writer, token string) error {
	z.log.Debug("zfs send -t")
	_, err := command.RunIO(ctx, nil, w, "zfs", "send", "-t", token)
	return classify(err)
}

// Hold places the user hold tag on each snapshot, in one command: a held snapshot cannot be
// destroyed (zfs destroy says "dataset is busy") until the tag is released.
func (z *ZFS) Hold(ctx context.Context, tag string, snapshots ...string) error {
	_, err := z.run(ctx, append([]string{"hold", tag}, snapshots...)...)
	return err
}

// Release removes the user hold tag from each snapshot.
func (z *ZFS) Release(ctx context.Context, tag string, snapshots ...string) error {
	_, err := z.run(ctx, append([]string{"release", tag}, snapshots...)...)
	return err
}

// Holds lists the user hold tags on snapshot.
func (z *ZFS) Holds(ctx context.Context, snapshot string) ([]string, error) {
	out, err := z.run(ctx, "holds", "-H", snapshot)
	if err != nil {
		return nil, err
	}
	var tags []string
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if f := strings.Split(line, "\t"); len(f) >= 2 {
			tags = append(tags, f[1])
		}
	}
	return tags, nil
}

// DevicePath is where udev links a zvol's block device.
func DevicePath(dataset string) string { return filepath.Join("/dev/zvol", dataset) }

// WaitDevice waits for a zvol's device node and returns it (/dev/zdN). zfs create and zfs clone
// return before the zvol's block device exists (ZFS makes it from a task queue) and before udev
// has linked it under /dev/zvol/ (openzfs #7875), so every caller that needs the device polls
// with a bound. It takes whichever comes first: the udev link, or the /dev/zdN node whose
// BLKZNAME ioctl (what udev's zvol_id asks) names the dataset. udev runs zvol_id and blkid for
// every new zvol before it makes the link, which make bench measured at 60-120 ms of each Create
// under emulation, and under load it lags by seconds, or never makes the link at all when its
// zvol_id lost the open to a contended ZFS lock; the kernel's node is there as soon as the zvol
// is.
func (z *ZFS) WaitDevice(ctx context.Context, dataset string, timeout time.Duration) (string, error) {
	path := DevicePath(dataset)
	start := time.Now()
	var dev string
	err := retry.DeviceNode.WithinTime(timeout).Poll(ctx, func() (bool, error) {
		// The link is only trusted once its device says it is this dataset's: udev updates
		// links after the fact, so right after a volume of the same name was removed (renamed
		// into the trash, or destroyed and its zd number reused) the link can still point at
		// another zvol. The checked node is returned, not the link udev may yet move.
		if d, err := filepath.EvalSymlinks(path); err == nil && zvolName(d) == dataset {
			dev = d
			return true, nil
		}
		// After a second of waiting, ask every device again, once a second: a name the index
		// learned can be stale when ZFS renamed the zvol after telling us (its renames of minors
		// run from a task queue, after zfs rename has returned) or someone renamed it behind our
		// back.
		rescan := noRescan
		if time.Since(start) > time.Second {
			rescan = time.Second
		}
		dev = z.findZvol(dataset, rescan)
		return dev != "", nil
	})
	if errors.Is(err, retry.ErrGaveUp) {
		if dev = z.findZvol(dataset, 0); dev != "" { // a last look at every device
			return dev, nil
		}
		return "", fmt.Errorf("zvol device of %s did not appear within %s (%s): is udev running (systemd-udevd), are the zvol rules installed, and does `zfs get volmode %s` say default or dev?", dataset, timeout, z.deviceReport(dataset), dataset)
	}
	if err != nil {
		return "", err
	}
	return dev, nil
}

// WaitNameGone waits, up to timeout, until no zvol device names dataset any more: after a rename,
// ZFS renames the zvol's device from a task queue, after zfs rename has returned. A zvol created
// under the old name before that task ran gets no device at all (ZFS skips a device whose name
// is taken, and the rename then moves the only one away), so whoever reuses a name waits here
// first.
func (z *ZFS) WaitNameGone(ctx context.Context, dataset string, timeout time.Duration) error {
	err := retry.DeviceRenamed.WithinTime(timeout).Poll(ctx, func() (bool, error) { return z.findZvol(dataset, 0) == "", nil })
	if errors.Is(err, retry.ErrGaveUp) {
		return fmt.Errorf("the zvol device of %s still has that name %s after the dataset was renamed", dataset, timeout)
	}
	return err
}

// deviceReport says what WaitDevice saw when it gave up, for its error.
func (z *ZFS) deviceReport(dataset string) string {
	link := "no udev link " + DevicePath(dataset)
	if dev, err := filepath.EvalSymlinks(DevicePath(dataset)); err == nil {
		name := zvolName(dev)
		if name == "" {
			name = "unreadable"
		}
		link = fmt.Sprintf("the udev link points at %s, which is %s", dev, name)
	}
	entries, _ := os.ReadDir("/sys/block")
	n := 0
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "zd") {
			n++
		}
	}
	return fmt.Sprintf("%s; none of the %d zd devices names it", link, n)
}

// blkzname is BLKZNAME, _IOR(0x12, 125, char[256]): a zvol's dataset name (see udev's zvol_id).
const blkzname = 0x8100127D

// zvolSeen is what findZvol learned of one zd device.
type zvolSeen struct {
	dataset string
	// ino is the inode of the device's /sys/block entry. ZFS reuses the lowest free zd number,
	// so a zvol destroyed behind this process's back and a new one can share a name; the new
	// device's sysfs entry is a new kernfs node, with a new inode.
	ino uint64
}

// noRescan is findZvol's rescan for "only the devices not identified yet".
const noRescan = time.Duration(-1)

// findZvol returns the /dev/zdN node whose zvol is dataset, or "". It opens only the zd devices
// it has not identified before, which after the first call are the new ones: opening a zvol
// takes ZFS's namespace lock, and a zvol held open makes a destroy of it fail as busy for that
// moment (udev's probes do the same, and destroys retry them). With rescan >= 0 it opens every
// device again if no call has done so for rescan, a bound shared by every waiter (32 Creates
// waiting at once make one rescan a second, not 32). A device identified in an earlier call is
// opened again before it is returned, since a rename keeps the device and changes its name.
func (z *ZFS) findZvol(dataset string, rescan time.Duration) string {
	entries, err := os.ReadDir("/sys/block")
	if err != nil {
		return ""
	}
	z.zvMu.Lock()
	defer z.zvMu.Unlock()
	full := rescan >= 0 && time.Since(z.rescanned) >= rescan
	if full {
		z.rescanned = time.Now()
	}
	present := make(map[string]bool, len(entries))
	found, fresh := "", false
	for _, e := range entries {
		dev := e.Name()
		if !strings.HasPrefix(dev, "zd") {
			continue
		}
		var st unix.Stat_t
		if unix.Lstat("/sys/block/"+dev, &st) != nil {
			continue // gone meanwhile
		}
		present[dev] = true
		seen, known := z.zvols[dev]
		learned := false
		if !known || seen.ino != st.Ino || full {
			name := zvolName("/dev/" + dev)
			if name == "" {
				delete(z.zvols, dev)
				continue // its node is not there yet, or the open was contended: next poll
			}
			seen, learned = zvolSeen{dataset: name, ino: st.Ino}, true
			z.zvols[dev] = seen
		}
		if seen.dataset == dataset && (found == "" || learned && !fresh) {
			found, fresh = dev, learned
		}
	}
	for dev := range z.zvols {
		if !present[dev] {
			delete(z.zvols, dev)
		}
	}
	if found == "" {
		return ""
	}
	if !fresh && zvolName("/dev/"+found) != dataset { // identified before, and renamed since
		delete(z.zvols, found)
		return ""
	}
	return "/dev/" + found
}

// forgetZvols drops name and its children from the device index: their devices are gone or
// renamed, and their numbers will be reused.
func (z *ZFS) forgetZvols(name string) {
	z.zvMu.Lock()
	defer z.zvMu.Unlock()
	for dev, seen := range z.zvols {
		if seen.dataset == name || strings.HasPrefix(seen.dataset, name+"/") {
			delete(z.zvols, dev)
		}
	}
}

// ZvolName returns the dataset whose zvol the block device dev is, or "" (not a zvol, or gone).
func ZvolName(dev string) string { return zvolName(dev) }

func zvolName(dev string) string {
	fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return ""
	}
	defer unix.Close(fd)
	var name [256]byte
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), blkzname, uintptr(unsafe.Pointer(&name[0]))); errno != 0 {
		return ""
	}
	return unix.ByteSliceToString(name[:])
}

// DDTEntries returns the number of dedup-table entries in pool, from `zpool status -D`.
func (z *ZFS) DDTEntries(ctx context.Context, pool string) (uint64, error) {
	out, err := z.zpool(ctx, "status", "-D", pool)
	if err != nil {
		return 0, classify(err)
	}
	return ParseDDTEntries(string(out))
}

// ParseDDTEntries reads the entry count from `zpool status -D` output: "dedup: no DDT entries" is 0,
// otherwise "dedup: DDT entries N, size ...".
func ParseDDTEntries(status string) (uint64, error) {
	for _, line := range strings.Split(status, "\n") {
		line = strings.TrimSpace(line)
		if !strings.HasPrefix(line, "dedup:") {
			continue
		}
		if strings.Contains(line, "no DDT entries") {
			return 0, nil
		}
		f := strings.Fields(strings.TrimPrefix(line, "dedup:"))
		for i := 0; i+2 < len(f); i++ {
			if f[i] == "DDT" && f[i+1] == "entries" {
				return strconv.ParseUint(strings.TrimSuffix(f[i+2], ","), 10, 64)
			}
		}
	}
	return 0, fmt.Errorf("zpool status -D: no dedup line in output")
}

// PoolOf returns the pool name of a dataset.
func PoolOf(dataset string) string {
	pool, _, _ := strings.Cut(dataset, "/")
	return pool
}

// Pools lists the imported pools.
func (z *ZFS) Pools(ctx context.Context) ([]string, error) {
	out, err := z.zpool(ctx, "list", "-H", "-o", "name")
	if err != nil {
		return nil, classify(err)
	}
	return strings.Fields(string(out)), nil
}

// OpenZvol opens the block device dev read-only and returns it if it is dataset's zvol. Holding
// it open keeps the zvol's last close, which waits for a transaction group to sync when the
// zvol was written (docs/design-facts.md, "The last close of a zvol"), for when it is closed.
func OpenZvol(dev, dataset string) (*os.File, error) {
	f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	var name [256]byte
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), blkzname, uintptr(unsafe.Pointer(&name[0]))); errno != 0 {
		f.Close()
		return nil, fmt.Errorf("%s is not a zvol: %w", dev, errno)
	}
	if got := unix.ByteSliceToString(name[:]); got != dataset {
		f.Close()
		return nil, fmt.Errorf("%s is the zvol of %s, not of %s", dev, got, dataset)
	}
	return f, nil
}

// TxgSync is one transaction group's timing, from /proc/spl/kstat/zfs/POOL/txgs.
type TxgSync struct {
	Txg      uint64
	Dirty    uint64        // bytes of dirty data it carried (ndirty)
	Open     time.Duration // otime: how long it was open for new changes
	Sync     time.Duration // stime: how long the pool took to write it out
	Written  uint64        // nwritten
	Complete bool          // state C: synced
}

// TxgSyncs returns the pool's recent transaction groups (the kernel keeps zfs_txg_history of
// them, 100 by default), oldest first. Every admin command (clone, rename, set, destroy) waits for
// one to sync, so their sync times are what a slow Create is waiting on.
func TxgSyncs(pool string) ([]TxgSync, error) {
	data, err := os.ReadFile(filepath.Join("/proc/spl/kstat/zfs", pool, "txgs"))
	if err != nil {
		return nil, err
	}
	return ParseTxgs(string(data))
}

// ParseTxgs parses the txgs kstat: a header line naming the columns, then one line a txg.
func ParseTxgs(s string) ([]TxgSync, error) {
	var cols map[string]int
	var out []TxgSync
	for _, line := range strings.Split(s, "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if f[0] == "txg" {
			cols = map[string]int{}
			for i, c := range f {
				cols[c] = i
			}
			continue
		}
		if cols == nil {
			continue // the kstat's own header line, before the column names
		}
		num := func(c string) uint64 {
			i, ok := cols[c]
			if !ok || i >= len(f) {
				return 0
			}
			n, _ := strconv.ParseUint(f[i], 10, 64)
			return n
		}
		state := ""
		if i, ok := cols["state"]; ok && i < len(f) {
			state = f[i]
		}
		t := TxgSync{Txg: num("txg"), Dirty: num("ndirty"), Written: num("nwritten"),
			Open: time.Duration(num("otime")), Sync: time.Duration(num("stime")), Complete: state == "C"}
		out = append(out, t)
	}
	if cols == nil {
		return nil, errors.New("txgs kstat: no column header")
	}
	return out, nil
}

// DDT reads the pool's dedup table from `zpool status -D`: its entries and the RAM they take
// (entries times the in-core size of one, which the same line gives).
func (z *ZFS) DDT(ctx context.Context, pool string) (entries, inCore uint64, err error) {
	out, err := z.zpool(ctx, "status", "-D", pool)
	if err != nil {
		return 0, 0, classify(err)
	}
	if entries, err = ParseDDTEntries(string(out)); err != nil || entries == 0 {
		return entries, 0, err
	}
	for _, line := range strings.Split(string(out), "\n") {
		// dedup: DDT entries 7, size 1.12K on disk, 256B in core
		if f := strings.Fields(line); len(f) > 2 && f[0] == "dedup:" && f[len(f)-1] == "core" {
			if per, ok := parseHumanSize(f[len(f)-3]); ok {
				return entries, entries * per, nil
			}
		}
	}
	return entries, 0, nil
}

// parseHumanSize reads zpool's sizes: 256B, 1.12K, 3M (powers of 1024).
func parseHumanSize(s string) (uint64, bool) {
	s = strings.TrimSuffix(s, ",")
	mult := 1.0
	for i, u := range "BKMGTP" {
		if strings.HasSuffix(s, string(u)) {
			s = strings.TrimSuffix(s, string(u))
			for range i {
				mult *= 1024
			}
			break
		}
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil {
		return 0, false
	}
	return uint64(f * mult), true
}

// PoolHealth is `zpool list`'s health (ONLINE, DEGRADED...) and capacity (percent used).
func (z *ZFS) PoolHealth(ctx context.Context, pool string) (string, int, error) {
	out, err := z.zpool(ctx, "list", "-H", "-p", "-o", "health,capacity", pool)
	if err != nil {
		return "", 0, classify(err)
	}
	f := strings.Fields(string(out))
	if len(f) != 2 {
		return "", 0, fmt.Errorf("zpool list %s: unexpected output %q", pool, out)
	}
	pct, err := strconv.Atoi(strings.TrimSuffix(f[1], "%"))
	return f[0], pct, err
}
