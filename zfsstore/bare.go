package zfsstore

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/moby/locker"
	"github.com/sirupsen/logrus"

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
//   - The properties follow in the background (settleLater): one zfs set per volume, the sync
//     task a clone with properties would have spent at its Create, off Create's path and after
//     the Creates cloning at that moment (yieldToCreates). Until then the origin is the truth;
//     once they are stored, the properties are. Storing them also keeps a volume whole across
//     a downgrade to a release that destroyed property-less clones at its start.
//   - Only two operations move a volume's origin: its own promotion, and a promotion of a fork
//     of it, whose reroot walks up through the fork's source. Promote and Fork therefore store
//     the derived properties on a bare volume first (settle), if the background has not yet.
//   - A settle reads the dataset at vol/NAME and sets what that dataset's origin says, under
//     the name's settling lock, which freeName takes too: the dataset cannot be replaced by a
//     new volume of the name between the read and the set.
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
// properties fillBare derives, when it is bare, and says whether it was; r is filled in either
// way. It is one zfs set, one sync task, only ever for a bare volume.
func (s *Store) settle(ctx context.Context, ds string, r zfsutil.Row) (bool, error) {
	if !s.fillBare(r) {
		return false, nil
	}
	s.log.WithField("dataset", ds).Info("storing a bare volume's properties")
	return true, mapErr(s.zfs.Set(ctx, ds, zfsutil.Props{
		propKind: r[propKind], propGolden: r[propGolden], propGeneration: r[propGeneration],
		propCreated: r[propCreated], propState: r[propState],
	}))
}

// settling is the background settles of bare volumes (settleLater).
type settling struct {
	once    sync.Once
	ctx     context.Context // cancelled by Close
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	pending atomic.Int32
	// names is locked per volume name around a settle's zfs get and zfs set, the set's wait
	// for a transaction group included, and briefly by freeName: a Create of a name whose
	// settle is under way waits for it (rare: a name removed and made again at once).
	names *locker.Locker
}

func (s *Store) settlingInit() *settling {
	s.settling.once.Do(func() {
		s.settling.ctx, s.settling.cancel = context.WithCancel(context.Background())
		s.settling.names = locker.New()
	})
	return &s.settling
}

// settleLater stores the properties of the bare volume name in the background, once the Creates
// cloning now are done; a failure is logged, and the next start tries again.
func (s *Store) settleLater(name string) {
	st := s.settlingInit()
	st.pending.Add(1)
	st.wg.Add(1)
	go func() {
		defer st.wg.Done()
		defer st.pending.Add(-1)
		s.yieldToCreates(st.ctx, 30*time.Second)
		s.cfg.Faults.Pause(st.ctx, "settle:waiting")
		set, err := s.settleName(st.ctx, name)
		if err != nil && st.ctx.Err() == nil {
			s.log.WithError(err).WithFields(logrus.Fields{"volume": name, "dataset": s.volDataset(name)}).Warn("could not store a bare volume's properties; they stay derived from its origin, and the next start tries again")
		}
		if set {
			s.cfg.Faults.Hit("settle:after-set")
		}
	}()
}

// settleName settles whatever volume is at vol/NAME now, and says whether it stored anything; a
// name with no dataset has nothing to settle (removed, or renamed away).
func (s *Store) settleName(ctx context.Context, name string) (bool, error) {
	if ctx.Err() != nil {
		return false, ctx.Err()
	}
	st := s.settlingInit()
	st.names.Lock(name)
	defer func() { _ = st.names.Unlock(name) }()
	ds := s.volDataset(name)
	row, err := s.zfs.Get(ctx, ds, append([]string{propState}, bareProps...)...)
	if errors.Is(err, zfsutil.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, mapErr(err)
	}
	return s.settle(ctx, ds, row)
}

// waitSettle waits until no settle of name is between its read and its set (freeName).
func (s *Store) waitSettle(name string) {
	st := s.settlingInit()
	st.names.Lock(name)
	_ = st.names.Unlock(name)
}

// stopSettling cancels the background settles and waits for them until ctx is done: those not
// done stay bare, and the next start settles them.
func (s *Store) stopSettling(ctx context.Context) error {
	st := s.settlingInit()
	st.cancel()
	done := make(chan struct{})
	go func() { st.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
