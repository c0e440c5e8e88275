package zfsutil

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// Release is an OpenZFS release, major.minor.patch; the Debian or Ubuntu revision is dropped.
type Release struct{ Major, Minor, Patch int }

var releaseRE = regexp.MustCompile(`(?:^|[^0-9.])([0-9]+)\.([0-9]+)(?:\.([0-9]+))?`)

// ParseRelease reads the first version in s: "2.1.11-1+deb12u1" (/sys/module/zfs/version),
// "zfs-2.4.4-1~bpo13+1" (zfs version) and "2.3" (a series) all parse.
func ParseRelease(s string) (Release, error) {
	m := releaseRE.FindStringSubmatch(s)
	if m == nil {
		return Release{}, fmt.Errorf("%q names no zfs release (want major.minor.patch)", strings.TrimSpace(s))
	}
	r := Release{}
	r.Major, _ = strconv.Atoi(m[1])
	r.Minor, _ = strconv.Atoi(m[2])
	if m[3] != "" {
		r.Patch, _ = strconv.Atoi(m[3])
	}
	return r, nil
}

func (r Release) String() string { return fmt.Sprintf("%d.%d.%d", r.Major, r.Minor, r.Patch) }

// Series is the release's major.minor, the unit ioctl changes come in.
func (r Release) Series() string { return fmt.Sprintf("%d.%d", r.Major, r.Minor) }

// Compare orders releases: -1, 0 or +1 as r is older than, the same as or newer than o.
func (r Release) Compare(o Release) int {
	return cmp.Or(cmp.Compare(r.Major, o.Major), cmp.Compare(r.Minor, o.Minor), cmp.Compare(r.Patch, o.Patch))
}

// ModuleVersionFile is where the loaded zfs module reports its version.
const ModuleVersionFile = "/sys/module/zfs/version"

// ModuleVersion is the loaded module's version string, as the kernel reports it.
func ModuleVersion() (string, error) {
	b, err := os.ReadFile(ModuleVersionFile)
	if err != nil {
		return "", fmt.Errorf("the zfs kernel module is not loaded (%w): modprobe zfs", err)
	}
	return strings.TrimSpace(string(b)), nil
}

// UserlandVersion is the version of the zfs command this process runs: the first line of
// `zfs version` ("zfs-2.1.11-1"), without its "zfs-" prefix.
func (z *ZFS) UserlandVersion(ctx context.Context) (string, error) {
	out, err := z.run(ctx, "version")
	if err != nil {
		return "", fmt.Errorf("zfs version: %w", err)
	}
	first, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	return strings.TrimPrefix(strings.TrimSpace(first), "zfs-"), nil
}

// ErrPair marks a refused userland and module pair: no backend choice may fall back past it.
var ErrPair = errors.New("zfs userland and module do not match")

// CheckPair says whether a zfs userland may drive a module (docs/design-facts.md, "Userland
// against the module"):
//   - a userland newer than its module is refused: that direction is known to fail sends and
//     listings, even between patch releases;
//   - the same release is what a distribution ships, and is accepted;
//   - an older userland is accepted on a module of its own series, or of a series in proven:
//     the module series this userland has passed zgolden's suites on.
func CheckPair(module, userland Release, proven []string) error {
	switch c := userland.Compare(module); {
	case c > 0:
		return fmt.Errorf("%w: the zfs userland %s is newer than the loaded zfs module %s, which is known to fail "+
			"sends and listings: load the module that matches (after a zfs upgrade, reboot), or install zfs "+
			"tools of release %s", ErrPair, userland, module, module)
	case c == 0, module.Series() == userland.Series(), slices.Contains(proven, module.Series()):
		return nil
	}
	on := userland.Series()
	if len(proven) > 0 {
		on = strings.Join(proven, ", ")
	}
	return fmt.Errorf("%w: the zfs module %s is newer than the zfs userland %s, and that pair is not proven "+
		"(this userland is proven on modules %s): use zfs tools of release %s; for the managed plugin, run "+
		"zgolden as a host daemon, which uses the host's own tools (README, \"Installing\"); or, at your own "+
		"risk, add %s to --zfs-proven (ZGOLDEN_ZFS_PROVEN)", ErrPair, module, userland, on, module.Series(), module.Series())
}

// ParseProven reads a --zfs-proven list: series such as "2.1,2.3 2.4", comma or space separated.
func ParseProven(s string) ([]string, error) {
	var out []string
	for _, f := range strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' }) {
		r, err := ParseRelease(f)
		if err != nil || r.Series() != f {
			return nil, fmt.Errorf("zfs series %q: want major.minor, such as 2.3", f)
		}
		out = append(out, f)
	}
	return out, nil
}
