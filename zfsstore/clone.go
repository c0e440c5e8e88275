package zfsstore

import (
	"context"
	"errors"
	"path"

	"github.com/zgolden/zgolden/zfsutil"
)

// How a volume's clone is made, by release (docs/design-facts.md, "One sync task per Create").
//
// Every sync task waits for a transaction group to sync, which on a busy pool takes tens of
// seconds. On OpenZFS 2.4 and later a Create's clone and its zgolden:* properties are one
// channel program, one sync task; before 2.4 zfs clone takes two (the clone, then its
// properties). A channel program sets user properties only, so the other properties a volume
// needs (dedup=off, the configured compression) are set once on PARENT/vol and PARENT/spare and
// inherited, on every release alike: only the number of sync tasks differs between releases.

// oneTaskRelease is the first release whose channel programs have zfs.sync.clone.
var oneTaskRelease = zfsutil.Release{Major: 2, Minor: 4}

// oneTaskModule says whether module (as /sys/module/zfs/version reads) has zfs.sync.clone.
// The channel program runs in the kernel: the userland's release does not matter.
func oneTaskModule(module string) bool {
	r, err := zfsutil.ParseRelease(module)
	return err == nil && r.Compare(oneTaskRelease) >= 0
}

// inherited is what every volume and spare clone gets from PARENT/vol and PARENT/spare.
func (s *Store) inherited() zfsutil.Props {
	// dedup=off whatever the pool inherits: clones share blocks through their snapshot, and a
	// dedup table would only add RAM and write latency (the seeds measured 4-6x).
	return zfsutil.Props{"dedup": "off", "compression": s.cfg.Compression}
}

// initInherited sets inherited() on PARENT/vol and PARENT/spare where they differ, which happens
// once per parent and again when --compression changes. A changed compression applies to the
// new writes of every volume that inherits it, which is every volume made on 2.4 and later.
// have holds the rows of PARENT's children, with dedup and compression, from initParent's listing.
func (s *Store) initInherited(ctx context.Context, have map[string]zfsutil.Row) error {
	want := s.inherited()
	for _, root := range []string{s.volRoot(), s.spareRoot()} {
		row := have[root]
		diff := zfsutil.Props{}
		for k, v := range want {
			if row[k] != v {
				diff[k] = v
			}
		}
		if err := s.zfs.Set(ctx, root, diff); err != nil {
			return err
		}
	}
	return nil
}

// clone makes ds, a volume or a spare, from snapshot with props: in one sync task when the module
// allows it and every property that is not a user property is one ds inherits, else with zfs
// clone. Either way ds exists with all of props, or not at all unless the error says otherwise
// (the caller's cleanupLate handles an abandoned command, as for zfs clone).
func (s *Store) clone(ctx context.Context, snapshot, ds string, props zfsutil.Props) error {
	if user, ok := s.userOnly(ds, props); ok && s.oneTask.Load() {
		err := s.zfs.CloneOneTask(ctx, snapshot, ds, user)
		if !errors.Is(err, zfsutil.ErrNoOneTaskClone) {
			return err
		}
		// A module that says 2.4 but lacks the call (a development build, say): zfs clone
		// from now on, and say so once.
		s.oneTask.Store(false)
		s.log.WithError(err).WithField("dataset", ds).Warn("this module cannot clone in one sync task; using zfs clone (two sync tasks)")
	}
	return s.zfs.Clone(ctx, snapshot, ds, props)
}

// userOnly returns props without what ds inherits, and whether nothing else was left.
func (s *Store) userOnly(ds string, props zfsutil.Props) (zfsutil.Props, bool) {
	if dir := path.Dir(ds); dir != s.volRoot() && dir != s.spareRoot() {
		return nil, false
	}
	inh := s.inherited()
	user := zfsutil.Props{}
	for k, v := range props {
		switch {
		case zfsutil.IsUserProp(k):
			user[k] = v
		case inh[k] != v:
			return nil, false
		}
	}
	return user, true
}

// cloneSyncTasks is how many sync tasks a block volume's clone costs on this module, for Status.
func (s *Store) cloneSyncTasks() int {
	if s.oneTask.Load() {
		return 1
	}
	return 2
}
