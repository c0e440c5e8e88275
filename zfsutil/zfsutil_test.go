package zfsutil_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/zgolden/zgolden/tests/harness"
	"github.com/zgolden/zgolden/zfsutil"
)

func TestParseDDTEntries(t *testing.T) {
	for in, want := range map[string]uint64{
		"  pool: p\n state: ONLINE\n dedup: no DDT entries\n":                                          0,
		" dedup: DDT entries 1234, size 272B on disk, 160B in core\n\nbucket ...":                      1234,
		"config:\n\n dedup: DDT entries 7, size 1.12K on disk, 256B in core\n errors: No known errors": 7,
	} {
		if got, err := zfsutil.ParseDDTEntries(in); err != nil || got != want {
			t.Errorf("ParseDDTEntries(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	if _, err := zfsutil.ParseDDTEntries("no dedup line"); err == nil {
		t.Error("ParseDDTEntries accepted output without a dedup line")
	}
}

// TestErrorsAreClassified: real zfs failures map to the sentinel errors callers act on.
func TestErrorsAreClassified(t *testing.T) {
	parent := harness.ZFSParent(t)
	z := zfsutil.New(logrus.NewEntry(logrus.New()))
	ctx := context.Background()
	if err := z.Destroy(ctx, parent+"/nope", false); !errors.Is(err, zfsutil.ErrNotFound) {
		t.Errorf("destroy of a missing dataset: %v, want ErrNotFound", err)
	}
	harness.Run(t, "zfs", "create", parent)
	if err := z.CreateFilesystem(ctx, parent, nil); !errors.Is(err, zfsutil.ErrExists) {
		t.Errorf("create of an existing dataset: %v, want ErrExists", err)
	}
	harness.Run(t, "zfs", "create", parent+"/fs")
	harness.Run(t, "zfs", "snapshot", parent+"/fs@s")
	harness.Run(t, "zfs", "clone", parent+"/fs@s", parent+"/c")
	if err := z.Destroy(ctx, parent+"/fs@s", false); !errors.Is(err, zfsutil.ErrHasDependents) {
		t.Errorf("destroy of a snapshot with a clone: %v, want ErrHasDependents", err)
	}
	if err := z.Destroy(ctx, parent+"/fs", false); err == nil || !strings.Contains(err.Error(), "zfs destroy") {
		t.Errorf("destroy of a dataset with snapshots: %v; want an error naming the command", err)
	}
}

// TestWaitDeviceWithoutUdevLink: WaitDevice does not wait for udev's /dev/zvol/ link (which
// lags by seconds under load) when the zvol's /dev/zdN node is there; and a zd number that a
// destroyed zvol gave back, reused for another, never makes it return the wrong device.
func TestWaitDeviceWithoutUdevLink(t *testing.T) {
	parent := harness.ZFSParent(t)
	z := zfsutil.New(logrus.NewEntry(logrus.New()))
	ctx := context.Background()
	harness.Run(t, "zfs", "create", parent)
	// same reports whether dev is the device udev links for ds, waiting for the link.
	same := func(dev, ds string) (string, bool) {
		t.Helper()
		link := zfsutil.DevicePath(ds)
		for i := 0; i < 600; i++ {
			if real, err := filepath.EvalSymlinks(link); err == nil {
				got, _ := filepath.EvalSymlinks(dev)
				return real, got == real
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Fatalf("udev never linked %s", link)
		return "", false
	}
	ds := parent + "/v"
	if err := z.CreateVolume(ctx, ds, 64<<20, nil); err != nil {
		t.Fatal(err)
	}
	dev, err := z.WaitDevice(ctx, ds, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	real, ok := same(dev, ds)
	if !ok {
		t.Fatalf("WaitDevice = %s, which is not %s's device %s", dev, ds, real)
	}
	if err := os.Remove(zfsutil.DevicePath(ds)); err != nil { // as if udev had not got to it yet
		t.Fatal(err)
	}
	dev, err = z.WaitDevice(ctx, ds, time.Minute)
	if err != nil || dev != real {
		t.Fatalf("WaitDevice without the link = %q, %v; want the zd node %s", dev, err, real)
	}

	// A link udev has not updated yet (a volume of the same name just renamed away) points at
	// another zvol: WaitDevice must not believe it.
	other := parent + "/other"
	if err := z.CreateVolume(ctx, other, 64<<20, nil); err != nil {
		t.Fatal(err)
	}
	otherDev, err := z.WaitDevice(ctx, other, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(otherDev, zfsutil.DevicePath(ds)); err != nil { // ds's link is still removed
		t.Fatal(err)
	}
	if dev, err := z.WaitDevice(ctx, ds, time.Minute); err != nil || dev != real {
		t.Fatalf("WaitDevice with a stale link to %s = %q, %v; want %s", otherDev, dev, err, real)
	}
	_ = os.Remove(zfsutil.DevicePath(ds))

	// Numbers are reused: destroyed through z (which forgets it), and behind its back.
	if err := z.Destroy(ctx, ds, false); err != nil {
		t.Fatal(err)
	}
	for i, byHand := range []bool{false, true} {
		next := parent + "/w" + strconv.Itoa(i)
		if byHand {
			harness.Run(t, "zfs", "create", "-V", "64M", next)
		} else if err := z.CreateVolume(ctx, next, 64<<20, nil); err != nil {
			t.Fatal(err)
		}
		dev, err := z.WaitDevice(ctx, next, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		if real, ok := same(dev, next); !ok {
			t.Fatalf("WaitDevice(%s) = %s, but its device is %s (a stale number)", next, dev, real)
		}
		if byHand {
			break
		}
		harness.Run(t, "zfs", "destroy", next) // behind z's back: z still knows its number
	}
}
