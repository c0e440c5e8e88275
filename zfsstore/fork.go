package zfsstore

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/zfsutil"
)

// Forks (-o from=VOLUME).
//
// A fork is a clone of a snapshot of its source volume, SOURCE@fork-ID: O(1), whatever the source
// holds. Such a snapshot is the only kind a volume keeps, and the rules for it are:
//   - It lives exactly as long as it has a clone. A fork snapshot without one (a crash between the
//     snapshot and the clone, or its fork destroyed) is destroyed: by Load, and by destroyVolume
//     when the fork it carried goes.
//   - A fork never pins its source. Destroying a volume that carries fork snapshots first promotes
//     the clone of the newest of them (zfs promote, O(1)): that moves those snapshots, with every
//     clone hanging off them, to the fork, and makes the volume a clone of it; the volume is then
//     destroyed as any other, and the snapshot it hung off, left without a clone, goes too.
//   - A promotion of a volume that carries fork snapshots moves the older ones into the new
//     lineage with the volume's history (the package doc): the forks then hang off the lineage.
//     Goldens counts such a fork as a dependent of the newest generation at or before its
//     snapshot in that lineage, so RemoveGolden refuses while it lives (--force removes it) and a
//     reclaim keeps that generation.
//   - zgolden:forkof on the fork names its source, for `docker volume inspect`; the fork also
//     carries its source's golden and generation, which its content came from.
const (
	forkPrefix = "fork-"
	propForkOf = propPrefix + driver.MetaForkOf
)

// isForkSnapshot says whether name (DATASET@SNAP) is a fork snapshot.
func isForkSnapshot(name string) bool {
	_, snap, ok := strings.Cut(name, "@")
	return ok && strings.HasPrefix(snap, forkPrefix)
}

// Fork implements driver.Backend.
func (s *Store) Fork(ctx context.Context, src driver.Volume, mountpoint string, spec driver.Spec) (driver.Volume, error) {
	v, err := s.fork(ctx, src, mountpoint, spec)
	return v, s.slowPool(err)
}

func (s *Store) fork(ctx context.Context, src driver.Volume, mountpoint string, spec driver.Spec) (driver.Volume, error) {
	ctx, cancel := workContext(ctx)
	defer cancel()
	if err := s.freeName(ctx, spec.Name); err != nil {
		return driver.Volume{}, err
	}
	// The source must be at vol/NAME: a snapshot of a claimed spare could race its rename.
	if err := s.finishClaim(ctx, src.Name); err != nil {
		return driver.Volume{}, err
	}
	srcDS := s.volDataset(src.Name)
	ds := s.volDataset(spec.Name)
	row, err := s.zfs.Get(ctx, srcDS, append([]string{"refquota", propGolden, propGeneration, propColdStart, propGrow, propState}, bareProps...)...)
	if err != nil {
		return driver.Volume{}, mapErr(err)
	}
	// A promotion of the fork would move the source's origin (bare.go): a bare source gets its
	// properties first, which the fork copies below.
	if _, err := s.settle(ctx, srcDS, row); err != nil {
		return driver.Volume{}, err
	}
	if mountpoint == "" && src.Kind == driver.KindBlock {
		mountpoint = s.premountOf(srcDS) // an early-mounted spare's XFS is frozen like Docker's mount
	}
	// Unique per source: the driver holds the source's lock, and nanoseconds never repeat under it.
	snap := srcDS + "@" + forkPrefix + strconv.FormatInt(time.Now().UnixNano(), 36)
	log := s.log.WithFields(logrus.Fields{"volume": spec.Name, "dataset": ds, "fork_of": src.Name, "snapshot": snap})
	now := time.Now().UTC()
	props := zfsutil.Props{
		propKind:    string(src.Kind),
		propCreated: strconv.FormatInt(now.Unix(), 10),
		propState:   "ready", // a clone is complete the moment it exists
		propForkOf:  src.Name,
	}
	for k, v := range s.inherited() {
		props[k] = v
	}
	for _, k := range []string{propGolden, propGeneration, propColdStart, propGrow} {
		if row[k] != "" {
			props[k] = row[k]
		}
	}
	if src.Kind == driver.KindFS {
		props["mountpoint"] = "legacy"
		if q := row.Uint("refquota"); q > 0 { // a clone does not inherit its origin's quota
			props["refquota"] = strconv.FormatUint(q, 10)
		}
	}
	if err := s.snapshotConsistent(ctx, src.Kind, mountpoint, snap); err != nil {
		return driver.Volume{}, err
	}
	s.cfg.Faults.Hit("fork:after-snapshot")
	s.cloning.Add(1)
	err = s.clone(ctx, snap, ds, props)
	s.cloning.Add(-1)
	if err != nil {
		if !s.cleanupLate(spec.Name, ds, err, log) {
			s.dropForkLater(ctx, log, snap)
		} // else the late clone's cleanup leaves the snapshot without a clone: Load drops it
		return driver.Volume{}, mapErr(err)
	}
	if src.Kind == driver.KindBlock {
		if _, err := s.zfs.WaitDevice(ctx, ds, s.cfg.DeviceTimeout); err != nil {
			s.rollback(ctx, log, spec.Name, ds)
			s.dropForkLater(ctx, log, snap)
			return driver.Volume{}, err
		}
	}
	s.setGrowing(spec.Name, row[propGrow] == driver.MetaYes)
	log.WithField("frozen", mountpoint != "").Debug("volume forked")
	v := driver.VolumeFromMeta(spec.Name, func(key string) string { return row[propPrefix+key] })
	v.Kind, v.CreatedAt, v.Size, v.Source, v.ForkOf = src.Kind, time.Unix(now.Unix(), 0).UTC(), src.Size, ds, src.Name
	return v, nil
}

// destroyVolume destroys a volume's dataset, and never the forks made of it (see the rules above).
func (s *Store) destroyVolume(ctx context.Context, ds string) error {
	if !inside(s.cfg.Parent, ds) || ds == s.cfg.Parent {
		return fmt.Errorf("refusing to destroy %s: it is outside zgolden's parent dataset %s", ds, s.cfg.Parent)
	}
	row, err := s.zfs.Get(ctx, ds, "origin")
	if errors.Is(err, zfsutil.ErrNotFound) {
		return nil
	}
	if err != nil {
		return mapErr(err)
	}
	origin := row["origin"]
	if heir, snap, err := s.forkHeir(ctx, ds); err != nil {
		return err
	} else if heir != "" {
		log := s.log.WithFields(logrus.Fields{"dataset": ds, "fork": heir, "snapshot": snap})
		if err := s.zfs.Promote(ctx, heir); err != nil {
			return mapErr(fmt.Errorf("promote fork %s before destroying %s: %w", heir, ds, err))
		}
		log.Info("promoted a fork so that it outlives the volume it was forked from")
		origin = heir + "@" + snap // the volume is the fork's clone now
	}
	if err := s.destroy(ctx, ds, true); err != nil {
		return err
	}
	if isForkSnapshot(origin) {
		return s.dropForkSnapshot(ctx, origin)
	}
	return nil
}

// forkHeir returns the clone of ds's newest fork snapshot that has one, and that snapshot's short
// name; "" when no fork hangs off ds.
func (s *Store) forkHeir(ctx context.Context, ds string) (heir, snap string, err error) {
	rows, err := s.zfs.List(ctx, ds, []string{"snapshot"}, []string{"createtxg", "clones"})
	if err != nil {
		return "", "", mapErr(err)
	}
	rows = slices.DeleteFunc(rows, func(r zfsutil.Row) bool {
		dsPart, _, _ := strings.Cut(r["name"], "@")
		return dsPart != ds || !isForkSnapshot(r["name"]) || r["clones"] == ""
	})
	if len(rows) == 0 {
		return "", "", nil
	}
	newest := slices.MaxFunc(rows, func(a, b zfsutil.Row) int { return cmp.Compare(a.Uint("createtxg"), b.Uint("createtxg")) })
	clone, _, _ := strings.Cut(newest["clones"], ",")
	_, snap, _ = strings.Cut(newest["name"], "@")
	return clone, snap, nil
}

// dropForkSnapshot destroys a fork snapshot that no clone hangs off any more.
func (s *Store) dropForkSnapshot(ctx context.Context, snap string) error {
	row, err := s.zfs.Get(ctx, snap, "clones")
	switch {
	case errors.Is(err, zfsutil.ErrNotFound):
		return nil
	case err != nil:
		return mapErr(err)
	case row["clones"] != "":
		return nil
	}
	s.log.WithField("snapshot", snap).Debug("destroying a fork snapshot left without its fork")
	return s.destroy(ctx, snap, false)
}

// dropForkLater is a failed fork's rollback of its snapshot, bounded on its own context. A
// snapshot whose clone's rollback still runs in the background keeps its clone for now, and is
// left for Load, which destroys fork snapshots without clones.
func (s *Store) dropForkLater(ctx context.Context, log *logrus.Entry, snap string) {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	if err := s.dropForkSnapshot(cctx, snap); err != nil {
		log.WithError(err).Error("could not destroy a failed fork's snapshot; it is destroyed at the next start")
	}
}
