package zfsutil

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/zgolden/zgolden/tests/harness"
)

// TestFindZvolBehindItsBack drives the device index without udev's links, the path WaitDevice
// depends on when udev lags or never links a zvol: a zd number that a zvol destroyed by hand
// left and a new zvol took (the index knew the number as the old zvol's), and a zvol renamed by
// hand (same device, new name), the second through WaitDevice with the link removed.
func TestFindZvolBehindItsBack(t *testing.T) {
	parent := harness.ZFSParent(t)
	z := New(logrus.NewEntry(logrus.New()))
	ctx := context.Background()
	harness.Run(t, "zfs", "create", parent)
	// find polls the index alone, no rescans: new devices are what it must see.
	find := func(ds string) string {
		t.Helper()
		for i := 0; i < 600; i++ {
			if dev := z.findZvol(ds, noRescan); dev != "" {
				return dev
			}
			time.Sleep(50 * time.Millisecond)
		}
		return ""
	}
	gone := func(dev string) {
		t.Helper()
		for i := 0; i < 600; i++ {
			if _, err := os.Stat(filepath.Join("/sys/block", filepath.Base(dev))); os.IsNotExist(err) {
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Fatalf("%s stayed after its zvol was destroyed", dev)
	}

	prev := parent + "/v0"
	if err := z.CreateVolume(ctx, prev, 64<<20, nil); err != nil {
		t.Fatal(err)
	}
	prevDev := find(prev)
	if prevDev == "" {
		t.Fatalf("no zd device names %s", prev)
	}
	// ZFS gives a new zvol the lowest free number; a lower hole left by another test takes a
	// few rounds to fill before the number is the one just freed.
	reused := ""
	for i := 1; i <= 20 && reused == ""; i++ {
		destroyBehindItsBack(t, prev) // its index still names prevDev prev
		gone(prevDev)
		next := parent + "/v" + strconv.Itoa(i)
		harness.Run(t, "zfs", "create", "-V", "64M", next)
		dev := find(next)
		if dev == "" {
			t.Fatalf("round %d: findZvol never found %s (the index kept a stale name?)", i, next)
		}
		if dev == prevDev {
			reused = next
		}
		prev, prevDev = next, dev
	}
	if reused == "" {
		t.Fatal("ZFS never reused a zd number in 20 rounds; the test proves nothing")
	}

	renamed := parent + "/renamed"
	harness.Run(t, "zfs", "rename", reused, renamed) // the index still names the device reused
	// Without udev's link, only asking every device again finds it; WaitDevice does that once a
	// second.
	harness.Run(t, "udevadm", "settle")
	if err := os.Remove(DevicePath(renamed)); err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	if dev, err := z.WaitDevice(ctx, renamed, 30*time.Second); err != nil || dev != prevDev {
		t.Fatalf("after a rename by hand, without its link, WaitDevice(%s) = %q, %v; want %s", renamed, dev, err, prevDev)
	}
	if dev := z.findZvol(reused, noRescan); dev != "" {
		t.Fatalf("findZvol(%s) = %s after that zvol was renamed away", reused, dev)
	}
}

// destroyBehindItsBack destroys ds with the zfs command, not through ZFS, retrying while udev's
// probe of the new zvol still holds it open ("dataset is busy": on zfs 2.4 with kernel 6.12 the
// probe was still running when the test destroyed the zvol it had just found).
func destroyBehindItsBack(t *testing.T, ds string) {
	t.Helper()
	for i := 0; ; i++ {
		out, err := harness.Output("zfs", "destroy", ds)
		if err == nil {
			return
		}
		if !strings.Contains(out, "busy") || i == 50 {
			t.Fatalf("zfs destroy %s: %v\n%s", ds, err, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
