package zfsutil_test

import (
	"context"
	"errors"
	"os"
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

// TestWaitDeviceWithoutUdevLink: when udev has not linked /dev/zvol/... (it lags under load),
// WaitDevice finds the zvol's /dev/zdN node itself.
func TestWaitDeviceWithoutUdevLink(t *testing.T) {
	parent := harness.ZFSParent(t)
	z := zfsutil.New(logrus.NewEntry(logrus.New()))
	ctx := context.Background()
	harness.Run(t, "zfs", "create", parent)
	ds := parent + "/v"
	if err := z.CreateVolume(ctx, ds, 64<<20, nil); err != nil {
		t.Fatal(err)
	}
	link, err := z.WaitDevice(ctx, ds, time.Minute)
	if err != nil || link != zfsutil.DevicePath(ds) {
		t.Fatalf("WaitDevice = %q, %v; want the udev link", link, err)
	}
	real, err := os.Readlink(link)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(link); err != nil { // as if udev had not got to it yet
		t.Fatal(err)
	}
	dev, err := z.WaitDevice(ctx, ds, time.Minute)
	if err != nil || !strings.HasPrefix(dev, "/dev/zd") || !strings.HasSuffix(real, strings.TrimPrefix(dev, "/dev/")) {
		t.Fatalf("WaitDevice without the link = %q, %v; want the zd node the link pointed to (%s)", dev, err, real)
	}
}
