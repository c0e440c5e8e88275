package zfsutil_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/zgolden/zgolden/tests/harness"
	"github.com/zgolden/zgolden/zfsutil"
)

// moduleRelease is the guest's loaded module, which decides what a channel program can call.
func moduleRelease(t *testing.T) zfsutil.Release {
	t.Helper()
	v, err := zfsutil.ModuleVersion()
	if err != nil {
		t.Fatal(err)
	}
	r, err := zfsutil.ParseRelease(v)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// TestCloneOneTask: on 2.4 and later the clone and its user properties land in one transaction
// group (one sync task, one wait on a busy pool), the zvol gets its device, and every failure
// leaves no clone behind and maps to the sentinel errors. Before 2.4 the call says the module
// cannot, and makes nothing, which is what the store's fallback to zfs clone rests on.
func TestCloneOneTask(t *testing.T) {
	parent := harness.ZFSParent(t)
	harness.Run(t, "zfs", "create", parent)
	harness.Run(t, "zfs", "create", "-s", "-V", "64M", parent+"/src")
	harness.Run(t, "zfs", "snapshot", parent+"/src@g")
	z := zfsutil.New(logrus.NewEntry(logrus.New()))
	ctx := context.Background()
	dest := parent + "/c1"
	props := zfsutil.Props{"zgolden:state": "ready", "zgolden:golden": "prj", "zgolden:generation": "3"}

	err := z.CloneOneTask(ctx, parent+"/src@g", dest, props)
	if moduleRelease(t).Compare(zfsutil.Release{Major: 2, Minor: 4}) < 0 {
		if !errors.Is(err, zfsutil.ErrNoOneTaskClone) {
			t.Fatalf("CloneOneTask on module %s: %v, want ErrNoOneTaskClone", moduleRelease(t), err)
		}
		if ok, _ := z.Exists(ctx, dest); ok {
			t.Fatalf("CloneOneTask without zfs.sync.clone left %s behind", dest)
		}
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	for k, want := range props {
		out := harness.Run(t, "zfs", "get", "-H", "-o", "value,source", k, dest)
		if got := strings.TrimSpace(out); got != want+"\tlocal" {
			t.Errorf("%s %s = %q, want %q set locally", dest, k, got, want)
		}
	}
	var cloneTxg int64
	sets := map[int64]int{}
	for _, ev := range harness.SyncEvents(t, dest) {
		switch ev.Op {
		case "clone":
			cloneTxg = ev.Txg
		case "set":
			sets[ev.Txg]++
		}
	}
	if cloneTxg == 0 || sets[cloneTxg] != len(props) || len(sets) != 1 {
		t.Errorf("history of %s: clone in txg %d, property sets by txg %v; want all %d sets in the clone's txg", dest, cloneTxg, sets, len(props))
	}
	if _, err := z.WaitDevice(ctx, dest, 30*time.Second); err != nil {
		t.Errorf("the one-task clone's zvol got no device: %v", err)
	}

	if err := z.CloneOneTask(ctx, parent+"/src@g", dest, props); !errors.Is(err, zfsutil.ErrExists) {
		t.Errorf("clone onto an existing dataset: %v, want ErrExists", err)
	}
	if err := z.CloneOneTask(ctx, parent+"/src@nope", parent+"/c2", props); !errors.Is(err, zfsutil.ErrNotFound) {
		t.Errorf("clone of a missing snapshot: %v, want ErrNotFound", err)
	}
	// A value past ZAP_MAXVALUELEN fails its set_prop after the clone was made in the same task.
	long := zfsutil.Props{"zgolden:state": "ready", "zgolden:x": strings.Repeat("a", 9000)}
	if err := z.CloneOneTask(ctx, parent+"/src@g", parent+"/c3", long); err == nil || !strings.Contains(err.Error(), "zgolden:x") {
		t.Errorf("clone with a property ZFS refuses: %v, want an error naming the property", err)
	}
	if ok, err := z.Exists(ctx, parent+"/c3"); ok || err != nil {
		t.Errorf("a clone whose property failed was left behind (exists %v, %v)", ok, err)
	}
	if err := z.CloneOneTask(ctx, parent+"/src@g", parent+"/c4", zfsutil.Props{"dedup": "off"}); err == nil {
		t.Error("CloneOneTask accepted a property that is not a user property")
	}
}
