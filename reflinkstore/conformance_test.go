package reflinkstore_test

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/driver/drivertest"
	"github.com/zgolden/zgolden/reflinkstore"
)

// TestConformance runs the suite every backend must pass, on both kinds of root: the host's disk
// (ext4 here, so the store keeps a store file) and a fresh XFS with reflink=1 (images on it
// directly).
func TestConformance(t *testing.T) {
	for _, kind := range []string{"storefile", "xfs"} {
		t.Run(kind, func(t *testing.T) {
			requireHost(t)
			drivertest.Run(t, func(t *testing.T) drivertest.Env {
				base := newBase(t)
				root := filepath.Join(base, "zg")
				if kind != "storefile" {
					root = filepath.Join(nativeFS(t, base, kind), "zg")
				}
				var opened []*reflinkstore.Store
				t.Cleanup(func() {
					// The suite's own cleanup (registered later, so run earlier) unmounted the
					// volumes; release the store file now, as an uninstaller would, and the lock
					// of every store the suite opened (it reopens without closing, like kill -9).
					for i := len(opened) - 1; i >= 0; i-- {
						if err := opened[i].Close(testCtx(t)); err != nil {
							t.Errorf("Close: %v", err)
						}
					}
				})
				return drivertest.Env{
					Open: func(t *testing.T) driver.Backend {
						s, err := reflinkstore.New(testCtx(t), reflinkstore.Config{
							Root: root, StoreSize: 8 << 30, DefaultSize: 1 << 30, Discard: true, Log: testLog(t),
						})
						if err != nil {
							t.Fatalf("reflinkstore.New: %v", err)
						}
						opened = append(opened, s)
						return s
					},
					Inventory: func(t *testing.T) []string { return inventory(t, root) },
					AfterRemove: func(t *testing.T) {
						// Nothing attached to an image once every volume is gone.
						if loops := loopsUnder(filepath.Join(root, "store")); len(loops) > 0 {
							t.Fatalf("loop devices still attached to images: %+v", loops)
						}
						if entries, _ := os.ReadDir(filepath.Join(root, "work")); len(entries) > 0 {
							names := make([]string, 0, len(entries))
							for _, e := range entries {
								names = append(names, e.Name())
							}
							slices.Sort(names)
							t.Fatalf("import work directories left behind: %v", names)
						}
					},
				}
			})
		})
	}
}
