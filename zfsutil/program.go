package zfsutil

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"

	"github.com/zgolden/zgolden/internal/command"
)

// ErrNoOneTaskClone is a module without zfs.sync.clone (OpenZFS before 2.4): the caller falls
// back to Clone.
var ErrNoOneTaskClone = errors.New("this ZFS module has no zfs.sync.clone channel program call (OpenZFS 2.4 and later)")

// cloneProgram clones argv[1] into argv[2] and sets the user properties that follow as
// name/value pairs, all inside the one sync task a channel program is. Lua's error() does not
// undo what the program already did, so a property that fails destroys the clone first: the
// program either makes the whole clone or nothing. Failures say "errno N" for CloneOneTask to
// classify.
const cloneProgram = `
local argv = (...)["argv"]
local snap, dest = argv[1], argv[2]
if zfs.sync.clone == nil then error("zgolden: no zfs.sync.clone") end
local err = zfs.sync.clone(snap, dest)
if err ~= 0 then error("zgolden: clone " .. dest .. ": errno " .. err) end
for i = 3, #argv, 2 do
	err = zfs.sync.set_prop(dest, argv[i], argv[i + 1])
	if err ~= 0 then
		zfs.sync.destroy(dest)
		error("zgolden: set " .. argv[i] .. " on " .. dest .. ": errno " .. err)
	end
end
`

var programErrno = regexp.MustCompile(`zgolden: .*: errno (\d+)`)

// errnoKinds maps what zfs.sync.* return to the sentinel errors the zfs command's messages map to.
var errnoKinds = map[syscall.Errno]error{
	syscall.ENOENT: ErrNotFound,
	syscall.EEXIST: ErrExists,
	syscall.EBUSY:  ErrBusy,
	syscall.ENOSPC: ErrNoSpace,
	syscall.EDQUOT: ErrNoSpace,
}

// CloneOneTask is Clone in one sync task instead of two: the clone and its user properties are
// one channel program (zfs.sync.clone, OpenZFS 2.4). On a busy pool every sync task waits for a
// transaction group to sync, tens of seconds each (docs/design-facts.md, "Transaction groups"),
// so this halves what a Create waits for; and a host crash can no longer leave a clone without
// its properties. Channel programs set only user properties: anything else must be inherited
// from the parent dataset. The zvol's device node is made after the program, in open context,
// as after zfs clone. A module without zfs.sync.clone gives ErrNoOneTaskClone and no clone.
func (z *ZFS) CloneOneTask(ctx context.Context, snapshot, dest string, props Props) error {
	args := []string{"program", PoolOf(dest), "-", snapshot, dest}
	keys := make([]string, 0, len(props))
	for k := range props {
		if !IsUserProp(k) {
			return fmt.Errorf("clone %s: %q is not a user property; a channel program sets only those", dest, k)
		}
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		args = append(args, k, props[k])
	}
	z.log.WithField("argv", args).Debug("zfs")
	ctx, cancel := context.WithTimeout(ctx, CommandTimeout)
	defer cancel()
	_, err := command.RunIO(ctx, bytes.NewReader([]byte(cloneProgram)), nil, "zfs", args...)
	return classifyProgram(err)
}

// IsUserProp says whether name is a user property (module:property), which ZFS never
// interprets.
func IsUserProp(name string) bool { return strings.Contains(name, ":") }

func classifyProgram(err error) error {
	var cerr *command.Error
	if !errors.As(err, &cerr) {
		return classify(err)
	}
	switch m := programErrno.FindStringSubmatch(cerr.Stderr); {
	case strings.Contains(cerr.Stderr, "zgolden: no zfs.sync.clone"):
		cerr.Kind = ErrNoOneTaskClone
	case m != nil:
		n, _ := strconv.Atoi(m[1])
		if kind, ok := errnoKinds[syscall.Errno(n)]; ok {
			cerr.Kind = kind
		}
	default:
		return classify(err)
	}
	return cerr
}
