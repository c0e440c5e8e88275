package driver

import (
	"errors"
	"fmt"
	"math"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// ErrInvalid marks a request the caller must change; it is never retried.
var ErrInvalid = errors.New("invalid request")

func invalidf(format string, a ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrInvalid}, a...)...)
}

// Names are used as ZFS dataset components and as directory names, so they are restricted to what
// is safe in both: no '/', '@', '%', '..', spaces, control characters or unicode. The first
// character is alphanumeric, as Docker itself requires of volume names.
var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]*$`)

const (
	// MaxNameLen keeps parent/vol/NAME@snapshot well inside ZFS's 255-byte dataset name limit
	// for any reasonable parent, and fits Docker's 64-hex generated names.
	MaxNameLen = 96
	// MaxProjectLen bounds golden project names the same way.
	MaxProjectLen = 64
)

// ValidateName checks a volume name.
func ValidateName(name string) error {
	return validate("volume name", name, MaxNameLen)
}

// ValidateProject checks a golden project name.
func ValidateProject(project string) error {
	return validate("golden project name", project, MaxProjectLen)
}

func validate(what, s string, max int) error {
	switch {
	case s == "":
		return invalidf("%s is empty", what)
	case len(s) > max:
		return invalidf("%s is %d bytes long; the limit is %d", what, len(s), max)
	case !nameRE.MatchString(s) || strings.Contains(s, ".."):
		return invalidf("%s %q is not allowed: use letters, digits, '_', '.' and '-', starting with a letter or digit (no '/', '@', '%%', '..', spaces or other characters)", what, s)
	}
	return nil
}

// Kind is what a volume holds.
type Kind string

const (
	// KindBlock is a block device with its own XFS: a ZFS zvol, or an image file on a loop device.
	// This is what Docker's /var/lib/docker needs (overlay2 requires XFS or ext4).
	KindBlock Kind = "block"
	// KindFS is a plain filesystem: a ZFS filesystem dataset, for git workspaces and other trees
	// that do not need their own XFS.
	KindFS Kind = "fs"
)

// Spec is a validated Create request.
type Spec struct {
	Name       string
	Golden     string // project whose golden to clone; "" for a plain volume
	Generation int    // 0 means the newest
	Size       uint64 // bytes; 0 means the configured default
	Kind       Kind
	// RequireGolden makes Create fail instead of cold-starting when the project has no golden.
	RequireGolden bool
	// From names the volume to fork: the new volume starts as a copy of its current content,
	// with its type, size, golden and generation. It excludes every option but itself.
	From string
}

// createOptions lists every -o option Create accepts, with its help text for error messages.
var createOptions = map[string]string{
	"golden":     "project whose golden to clone (letters, digits, '_', '.', '-')",
	"generation": "golden generation to clone (a positive integer; default: the newest)",
	"size":       "volume size, such as 20G or 500GiB (units K, M, G, T, P; binary)",
	"type":       "block (a zvol or image with XFS, for /var/lib/docker; default) or fs (a ZFS dataset, for git workspaces)",
	"cold":       "what to do when the project has no golden yet: allow (default, make an empty volume) or deny (fail)",
	"from":       "volume to fork: start as a copy of its current content, frozen for an instant if it is mounted (alone: not with golden, generation, size, type or cold)",
}

// OptionHelp lists the accepted options, sorted, for error messages and --help.
func OptionHelp() string {
	keys := make([]string, 0, len(createOptions))
	for k := range createOptions {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "\n  %s: %s", k, createOptions[k])
	}
	return b.String()
}

// ParseCreate validates a Create request's name and options. Options are never passed to zfs as
// properties: only the keys above exist, so mountpoint=, canmount= or dedup=on cannot be injected.
func ParseCreate(name string, opts map[string]string) (Spec, error) {
	spec := Spec{Name: name, Kind: KindBlock}
	if err := ValidateName(name); err != nil {
		return spec, err
	}
	var unknown []string
	for k := range opts {
		if _, ok := createOptions[k]; !ok {
			unknown = append(unknown, k)
		}
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		// Name a few, not all: the message goes to the docker command line and the plugin's
		// log, and a request with thousands of keys must not turn into a megabyte-long error.
		more := ""
		if n := len(unknown); n > maxListed {
			unknown, more = unknown[:maxListed], fmt.Sprintf(" and %d more", n-maxListed)
		}
		for i, k := range unknown {
			if len(k) > 64 {
				unknown[i] = k[:64] + "..."
			}
		}
		return spec, invalidf("unknown option(s) %s%s; zgolden accepts:%s", quoteAll(unknown), more, OptionHelp())
	}
	if from, ok := opts["from"]; ok {
		return parseFork(spec, from, opts)
	}
	if g, ok := opts["golden"]; ok {
		if err := ValidateProject(g); err != nil {
			return spec, fmt.Errorf("option golden: %w", err)
		}
		spec.Golden = g
	}
	if s, ok := opts["generation"]; ok {
		if spec.Golden == "" {
			return spec, invalidf("option generation=%s needs golden=PROJECT too", s)
		}
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			return spec, invalidf("option generation=%q must be a positive integer (see `zgolden golden ls`)", s)
		}
		spec.Generation = n
	}
	if s, ok := opts["size"]; ok {
		n, err := ParseSize(s)
		if err != nil {
			return spec, fmt.Errorf("option size: %w", err)
		}
		spec.Size = n
	}
	if t, ok := opts["type"]; ok {
		switch Kind(t) {
		case KindBlock, KindFS:
			spec.Kind = Kind(t)
		default:
			return spec, invalidf("option type=%q must be block or fs", t)
		}
	}
	if c, ok := opts["cold"]; ok {
		switch c {
		case "allow":
		case "deny":
			spec.RequireGolden = true
		default:
			return spec, invalidf("option cold=%q must be allow or deny", c)
		}
		if spec.Golden == "" {
			return spec, invalidf("option cold=%s needs golden=PROJECT too", c)
		}
	}
	return spec, nil
}

// parseFork validates -o from=VOLUME, which takes everything from its source: any other option
// would ask for something the fork cannot honour (another golden, another size or type).
func parseFork(spec Spec, from string, opts map[string]string) (Spec, error) {
	if err := ValidateName(from); err != nil {
		return spec, fmt.Errorf("option from: %w", err)
	}
	if from == spec.Name {
		return spec, invalidf("option from=%s names the volume being created; name another volume to fork", from)
	}
	var others []string
	for k := range opts {
		if k != "from" {
			others = append(others, k)
		}
	}
	if len(others) > 0 {
		sort.Strings(others)
		return spec, invalidf("option from=%s cannot be combined with %s: a fork takes its golden, generation, size and type from volume %q", from, strings.Join(others, ", "), from)
	}
	spec.From = from
	return spec, nil
}

// maxListed is how many unknown options an error names.
const maxListed = 5

func quoteAll(s []string) string {
	q := make([]string, len(s))
	for i, v := range s {
		q[i] = strconv.Quote(v)
	}
	return strings.Join(q, ", ")
}

// MinSize is the smallest volume zgolden makes: XFS needs about 300 MiB for its log and AGs.
const MinSize = 512 << 20

// MaxSize bounds sizes well below what overflows any tool's arithmetic.
const MaxSize = 1 << 60 // 1 EiB

var units = map[string]uint64{
	"": 1, "b": 1,
	"k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
	"m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
	"g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
	"t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40,
	"p": 1 << 50, "pb": 1 << 50, "pib": 1 << 50,
}

var sizeRE = regexp.MustCompile(`^([0-9]+)(\.[0-9]+)?\s*([A-Za-z]*)$`)

// ParseSize parses sizes such as "20G", "512MiB", "1.5T" or "1073741824". Units are binary
// (G = GiB), as zfs and docker use them. Zero, negative, fractional bytes, unknown units and
// anything over MaxSize are rejected.
func ParseSize(s string) (uint64, error) {
	m := sizeRE.FindStringSubmatch(strings.TrimSpace(s))
	if m == nil {
		return 0, invalidf("%q is not a size: use a number with an optional unit, such as 20G or 512MiB", s)
	}
	mult, ok := units[strings.ToLower(m[3])]
	if !ok {
		return 0, invalidf("%q has an unknown unit %q: use K, M, G, T or P (binary), optionally with B or iB", s, m[3])
	}
	whole, err := strconv.ParseUint(m[1], 10, 64)
	if err != nil || whole > MaxSize/mult {
		return 0, invalidf("%q is too large: the limit is 1 EiB", s)
	}
	n := whole * mult
	if m[2] != "" {
		frac, _ := strconv.ParseFloat("0"+m[2], 64)
		add := frac * float64(mult)
		if add != math.Trunc(add) {
			return 0, invalidf("%q is not a whole number of bytes", s)
		}
		n += uint64(add)
	}
	if n == 0 {
		return 0, invalidf("size %q is zero", s)
	}
	if n > MaxSize {
		return 0, invalidf("%q is too large: the limit is 1 EiB", s)
	}
	if n < MinSize {
		return 0, invalidf("size %q is below the minimum of 512M (XFS needs room for its log)", s)
	}
	return n, nil
}
