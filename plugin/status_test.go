package main

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/zgolden/zgolden/driver"
)

// TestStatusKeys: the typed status keeps the flat keys of `zgolden status --json` that scripts
// and the test suites read, leaves out what a backend did not report, and the text form sizes
// bytes in binary units.
func TestStatusKeys(t *testing.T) {
	ddt, last, worst := uint64(0), 0.5, 2.0
	zfs := driver.Status{Backend: "zfs", Volumes: 2, Mounted: 1, AvailableBytes: 3 << 30, RemovedPending: 1,
		SparesReady: map[string]int{"p": 2}, ClaimsPending: 1,
		ZFSStatus: &driver.ZFSStatus{Pool: "tank", DDTEntries: &ddt,
			TxgSyncLastSeconds: &last, TxgSyncMax10Seconds: &worst}}
	reflink := driver.Status{Backend: "reflink", ReflinkStatus: &driver.ReflinkStatus{StoreMode: "native", SizeBytes: 1 << 40}}
	for _, c := range []struct {
		st       driver.Status
		has, not []string
		text     []string
	}{
		{zfs, []string{"backend", "volumes", "available_bytes", "removed_pending", "pool", "ddt_entries", "spares_ready", "claims_pending", "txg_sync_max10_seconds"},
			[]string{"store_mode", "size_bytes", "host_available_bytes", "imports"},
			[]string{"available_bytes:  3.0 GiB", "ddt_entries:", "txg_sync_max10_seconds:  2", "spares_ready:", "map[p:2]"}},
		{reflink, []string{"store_mode", "size_bytes", "removed_pending", "claims_pending"},
			[]string{"pool", "ddt_entries", "host_available_bytes", "store_file"},
			[]string{"size_bytes:", "1.0 TiB", "store_mode:", "native"}},
	} {
		b, err := json.Marshal(c.st)
		if err != nil {
			t.Fatal(err)
		}
		var keys map[string]any
		if err := json.Unmarshal(b, &keys); err != nil {
			t.Fatal(err)
		}
		for _, k := range c.has {
			if _, ok := keys[k]; !ok {
				t.Errorf("%s status --json lacks %q: %s", c.st.Backend, k, b)
			}
		}
		for _, k := range c.not {
			if _, ok := keys[k]; ok {
				t.Errorf("%s status --json has %q, which it does not report: %s", c.st.Backend, k, b)
			}
		}
		var back driver.Status // what the command line decodes
		if err := json.Unmarshal(b, &back); err != nil {
			t.Fatal(err)
		}
		var text strings.Builder
		for _, l := range statusLines(back) {
			text.WriteString(l[0] + ":  " + l[1] + "\n")
		}
		for _, w := range c.text {
			if !strings.Contains(text.String(), w) {
				t.Errorf("%s status text lacks %q:\n%s", c.st.Backend, w, text.String())
			}
		}
	}
}
