package zfsstore

import (
	"context"
	"strconv"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/zfsutil"
)

// Bare volumes.
//
// Before 2.4, `zfs clone -o PROP=VALUE` is two sync tasks: the clone, then its properties
// (zfs_ioc_clone sets them after the clone's own task), and on a busy pool each sync task waits
// for a transaction group of tens of seconds. A plain `zfs clone` is one. So on those modules a
// Create that clones a block volume of a golden, at the generation's size, clones it bare, as a
// spare is made (spares.go): its properties are derived, not stored.
//   - Dedup and compression are inherited from PARENT/vol (initInherited).
//   - Its kind is block (it is a zvol); its golden and generation are read from its origin, the
//     generation snapshot (originGeneration); its creation time is ZFS's `creation`; it is ready
//     the moment it exists, since a clone exists whole or not at all.
//   - Load takes a zvol under PARENT/vol with no zgolden:state and such an origin as a volume.
//     Before, it destroyed such a zvol as a Create interrupted between the clone's two tasks;
//     that zvol is a complete clone too, as it is on 2.4, where the clone and its properties are
//     one task, and its Create's retry finds it.
//   - Only two operations move a volume's origin: its own promotion, and a promotion of a fork
//     of it, whose reroot walks up through the fork's source. Promote and Fork therefore store
//     the derived properties on a bare volume first (settle), in the zfs set the volume would
//     otherwise have paid for at its Create, and off Create's path.
//
// Volumes of other shapes (filesystems, grown clones, fresh volumes, forks) and every volume on
// 2.4, where one task carries the properties (clone.go), are made with their properties.

// bareProps are the columns fillBare reads, beyond the volume's own properties.
var bareProps = []string{"type", "origin", "creation"}

// fillBare completes r, a listing or get of a dataset under PARENT/vol with bareProps, when it
// is a bare volume: it sets the properties a volume cloned with them would carry, from the
// origin and the creation time. It returns whether r was bare.
func (s *Store) fillBare(r zfsutil.Row) bool {
	if r[propState] != "" || r["type"] != "volume" {
		return false
	}
	project, gen, ok := s.originGeneration(r["origin"])
	if !ok || r["creation"] == "" {
		return false
	}
	r[propKind] = string(driver.KindBlock)
	r[propGolden] = project
	r[propGeneration] = strconv.Itoa(gen)
	r[propCreated] = r["creation"]
	r[propState] = "ready"
	return true
}

// cloneBare says whether a Create clones its volume bare: a block volume at its generation's
// size, on a module that cannot clone with properties in one sync task.
func (s *Store) cloneBare(spec driver.Spec) bool {
	return spec.Kind == driver.KindBlock && spec.Size == 0 && !s.oneTask.Load()
}

// settle stores on ds, a volume whose row (with bareProps and propState) was read just now, the
// properties fillBare derives, when it is bare; r is filled in either way. It is one zfs set,
// one sync task, only ever for a bare volume.
func (s *Store) settle(ctx context.Context, ds string, r zfsutil.Row) error {
	if !s.fillBare(r) {
		return nil
	}
	s.log.WithField("dataset", ds).Info("storing a bare volume's properties before its origin can move")
	return mapErr(s.zfs.Set(ctx, ds, zfsutil.Props{
		propKind: r[propKind], propGolden: r[propGolden], propGeneration: r[propGeneration],
		propCreated: r[propCreated], propState: r[propState],
	}))
}
