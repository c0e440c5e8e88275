package zfsstore

import (
	"os"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/zgolden/zgolden/xfsutil"
	"github.com/zgolden/zgolden/zfsutil"
)

// Devices held open from Unmount to Remove.
//
// The last close of a zvol that was written waits for the pool to sync a transaction group
// (docs/design-facts.md, "The last close of a zvol"); under write load that is tens of seconds,
// and Docker gives Unmount one minute. When the XFS on a volume is unmounted, the mount's
// reference to the device is the last one, so Unmount would pay that wait. Unmount therefore
// opens the device before it unmounts and keeps it open: the unmount returns after XFS has
// flushed its log (which needs no transaction group), and the wait moves to the close, which
// the trash worker does just before it destroys the removed volume, off every caller's path.
//
// Rules:
//   - held maps a volume's dataset to its open device; only Unmount adds, and Remove (handing it
//     to the trash), Mount (closing it before the volume is mounted again) and Close take one
//     away. So the wait moves off Unmount and Remove, and a remount, rare in Docker's use (a
//     stopped container started again), pays it as it did before. A held device is read-only
//     and not exclusive.
//   - The map belongs to the process, not to a Store: an open file is the process's, and a
//     second Store on the same parent in this process (a test's simulated restart) must find
//     and close it, or its destroys would fail as busy.
//   - A dataset whose device is open cannot be destroyed ("dataset is busy"), but it can be
//     renamed: Remove renames with the device held and closes it in the trash.
//   - Nothing here is durable. A restart closes every held device (the process exits), which
//     costs the waits then, and Load starts with none.
var held heldDevices

type heldDevices struct {
	mu  sync.Mutex
	fds map[string]*os.File
}

func (h *heldDevices) hold(ds string, f *os.File) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.fds == nil {
		h.fds = map[string]*os.File{}
	}
	if old := h.fds[ds]; old != nil {
		if old != f {
			f.Close() // one open reference is enough
		}
		return
	}
	h.fds[ds] = f
}

// take removes and returns ds's held device, or nil.
func (h *heldDevices) take(ds string) *os.File {
	h.mu.Lock()
	defer h.mu.Unlock()
	f := h.fds[ds]
	delete(h.fds, ds)
	return f
}

// under removes and returns every held device of a dataset under root.
func (h *heldDevices) under(root string) map[string]*os.File {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := map[string]*os.File{}
	for ds, f := range h.fds {
		if inside(root, ds) {
			out[ds] = f
			delete(h.fds, ds)
		}
	}
	return out
}

// count is how many devices of datasets under root are held.
func (h *heldDevices) count(root string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for ds := range h.fds {
		if inside(root, ds) {
			n++
		}
	}
	return n
}

// holdDevice opens the zvol mounted at target, for Unmount.
func (s *Store) holdDevice(name, ds, target string) {
	m, err := xfsutil.MountedAt(target)
	if err != nil || m == nil {
		return
	}
	f, err := zfsutil.OpenZvol(m.Source, ds)
	if err != nil {
		// Not fatal: the unmount then pays the last close's wait itself, as it always did.
		s.log.WithError(err).WithFields(logrus.Fields{"volume": name, "dataset": ds}).Warn("could not hold the volume's device open across its unmount")
		return
	}
	held.hold(ds, f)
}

// closeDevice closes a held device and logs how long the close waited for the pool.
func (s *Store) closeDevice(f *os.File, ds string) {
	if f == nil {
		return
	}
	start := time.Now()
	f.Close()
	if d := time.Since(start); d > time.Second {
		s.log.WithFields(logrus.Fields{"dataset": ds, "seconds": d.Seconds()}).Info("closing a removed volume's device waited for the pool to sync")
	}
}

// rename moves a held device to the dataset's new name (a claimed spare renamed to its volume).
func (h *heldDevices) rename(from, to string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if f := h.fds[from]; f != nil {
		delete(h.fds, from)
		h.fds[to] = f
	}
}
