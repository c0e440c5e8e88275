package reflinkstore

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/xfsutil"
)

// Extended attributes: the store's durable state, the driver's metadata schema (driver.MetaKind
// and the rest) under the prefix "user.zgolden.". They are set on a temporary file before it is
// renamed into place, so no image is ever seen under its final name without them.
const (
	xattrPrefix    = "user.zgolden."
	attrKind       = driver.MetaKind // on images and on project directories
	attrGolden     = driver.MetaGolden
	attrGeneration = driver.MetaGeneration
	attrColdStart  = driver.MetaColdStart
	attrCreated    = driver.MetaCreated
	attrState      = driver.MetaState // ready on complete images; importing while an import copies
	attrFrom       = driver.MetaFrom
	attrGrow       = driver.MetaGrow
	attrLastGen    = "lastgen" // on a project directory: the highest generation number handed out
	attrForkOf     = driver.MetaForkOf
	attrGUID       = "guid"    // on a generation: its identity across hosts (transfer.go)
	attrSpareOf    = "spareof" // on a spare: the identity of the generation image it was cloned from (spares.go)

	stateReady     = "ready"
	stateImporting = "importing"
	yes            = driver.MetaYes
)

var knownAttrs = []string{attrKind, attrGolden, attrGeneration, attrColdStart, attrCreated, attrState, attrFrom, attrGrow, attrLastGen, attrForkOf, attrGUID, attrSpareOf}

type meta map[string]string

func (m meta) int(key string) int {
	n, _ := strconv.Atoi(m[key])
	return n
}

func (m meta) time(key string) time.Time {
	sec, _ := strconv.ParseInt(m[key], 10, 64)
	return time.Unix(sec, 0).UTC()
}

func xattrErr(op, path, attr string, err error) error {
	if errors.Is(err, unix.ENOTSUP) {
		return fmt.Errorf("%s %s on %s: the filesystem does not support user extended attributes, which zgolden keeps its metadata in: %w", op, attr, path, err)
	}
	return &os.PathError{Op: op + " " + attr, Path: path, Err: err}
}

// setAttrs sets m on an open file (a temporary image not yet renamed into place).
func setAttrs(f *os.File, m meta) error {
	for k, v := range m {
		if err := unix.Fsetxattr(int(f.Fd()), xattrPrefix+k, []byte(v), 0); err != nil {
			return xattrErr("setxattr", f.Name(), xattrPrefix+k, err)
		}
	}
	return nil
}

func setAttr(path, key, value string) error {
	if err := unix.Lsetxattr(path, xattrPrefix+key, []byte(value), 0); err != nil {
		return xattrErr("setxattr", path, xattrPrefix+key, err)
	}
	return nil
}

func removeAttr(path, key string) error {
	if err := unix.Lremovexattr(path, xattrPrefix+key); err != nil && !errors.Is(err, unix.ENODATA) {
		return xattrErr("removexattr", path, xattrPrefix+key, err)
	}
	return nil
}

// readMeta reads every known attribute of path; missing ones are absent from the map.
func readMeta(path string) (meta, error) {
	m := meta{}
	buf := make([]byte, 256)
	for _, k := range knownAttrs {
		for {
			n, err := unix.Lgetxattr(path, xattrPrefix+k, buf)
			if errors.Is(err, unix.ERANGE) && len(buf) < 1<<16 { // a long import source path
				buf = make([]byte, len(buf)*4)
				continue
			}
			if errors.Is(err, unix.ENODATA) {
				break
			}
			if err != nil {
				return nil, xattrErr("getxattr", path, xattrPrefix+k, err)
			}
			m[k] = string(buf[:n])
			break
		}
	}
	return m, nil
}

// Temporary images are named .tmp-BASE-RANDOM.img, where BASE is a volume name or genN. Valid
// names start with a letter or digit, so they never collide with a volume's or generation's.
const tmpPrefix = ".tmp-"

func newTemp(dir, base string) (*os.File, error) {
	return os.CreateTemp(dir, tmpPrefix+base+"-*"+imgExt)
}

func isTemp(name string) bool { return strings.HasPrefix(name, tmpPrefix) }

// removedBase starts the temporary name of a removed volume's image, .tmp-removed.NAME-NS.img,
// until its unlink is done. Like every temporary image it names no volume (tmpPrefix), and Load
// deletes it.
const removedBase = "removed."

func removedName(dir, volume string) (string, error) {
	if err := driver.ValidateName(volume); err != nil {
		return "", err
	}
	return filepath.Join(dir, tmpPrefix+removedBase+volume+"-"+strconv.FormatInt(time.Now().UnixNano(), 36)+imgExt), nil
}

func isRemoved(name string) bool { return strings.HasPrefix(name, tmpPrefix+removedBase) }

// tempGeneration returns N for a temporary generation image .tmp-genN-RANDOM.img.
func tempGeneration(name string) (int, bool) {
	rest, ok := strings.CutPrefix(name, tmpPrefix+genPrefix)
	if !ok {
		return 0, false
	}
	num, _, _ := strings.Cut(rest, "-")
	n, err := strconv.Atoi(num)
	return n, err == nil && n > 0
}

const genPrefix = "gen"

func genImage(dir string, n int) string {
	return filepath.Join(dir, genPrefix+strconv.Itoa(n)+imgExt)
}

// parseGen returns N for a generation image genN.img.
func parseGen(name string) (int, bool) {
	num, ok := strings.CutPrefix(name, genPrefix)
	if !ok {
		return 0, false
	}
	num, ok = strings.CutSuffix(num, imgExt)
	if !ok {
		return 0, false
	}
	n, err := strconv.Atoi(num)
	return n, err == nil && n > 0 && strconv.Itoa(n) == num
}

// commit makes a finished temporary image durable and renames it to final: the rename is the
// moment the image exists. It never replaces an existing file (RENAME_NOREPLACE, which XFS and
// btrfs support), so a name taken meanwhile fails with ErrExists instead of losing data.
func commit(f *os.File, final string) error {
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", f.Name(), err)
	}
	if err := unix.Renameat2(unix.AT_FDCWD, f.Name(), unix.AT_FDCWD, final, unix.RENAME_NOREPLACE); err != nil {
		if errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("%w: %s is already there", driver.ErrExists, final)
		}
		return &os.LinkError{Op: "rename", Old: f.Name(), New: final, Err: err}
	}
	return xfsutil.SyncDir(filepath.Dir(final))
}
