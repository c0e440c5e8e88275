package zfsstore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/xfsutil"
	"github.com/zgolden/zgolden/zfsutil"
)

// Goldens move between hosts as zfs send streams of their generation snapshots (docs/fleet.md):
//   - an export holds the snapshots it sends (a user hold tagged exportHoldPrefix+ID), so a
//     reclaim racing it finds the generation in use, and releases them when the stream ends;
//     Load releases holds a crash left;
//   - a receive makes a new lineage PROJECT/gN, marked receiving until it is complete and its
//     XFS has mounted read-only on this host's kernel, then ready (the point from which Creates
//     clone it). An incremental stream is received as a clone of the local base generation,
//     whose guid ZFS checks, and the new lineage is then re-rooted as a promotion's is. Never
//     -F, never -R: no local snapshot, volume or session is rolled back or destroyed.
//   - a crash mid-receive leaves a lineage that is not ready, which Load wipes as it wipes an
//     interrupted import.

var _ driver.Transferer = (*Store)(nil)

// exportHoldPrefix tags the holds an export places.
const exportHoldPrefix = "zgolden-export-"

// ExportGolden implements driver.Transferer.
func (s *Store) ExportGolden(ctx context.Context, project string, n, base int) (driver.StreamHeader, func(context.Context, io.Writer) error, error) {
	if err := driver.ValidateProject(project); err != nil {
		return driver.StreamHeader{}, nil, err
	}
	ps, err := s.projects(ctx, project)
	if err != nil {
		return driver.StreamHeader{}, nil, err
	}
	p := ps[project]
	if p == nil || len(p.generations()) == 0 {
		return driver.StreamHeader{}, nil, driver.GoldenMissingError(project)
	}
	gens := p.generations()
	gen := &gens[len(gens)-1]
	if n > 0 {
		if gen = findGeneration(gens, n); gen == nil {
			return driver.StreamHeader{}, nil, driver.GenerationMissingError(project, n)
		}
	}
	h := driver.StreamHeader{Kind: p.kind, Generation: gen.Number}
	snaps := []string{gen.Source}
	var from string
	if base > 0 {
		b := findGeneration(gens, base)
		if b == nil {
			return driver.StreamHeader{}, nil, driver.GenerationMissingError(project, base)
		}
		if b.Number >= gen.Number {
			return driver.StreamHeader{}, nil, fmt.Errorf("%w: generation %d is not older than generation %d", driver.ErrInvalid, base, gen.Number)
		}
		ok, err := s.ancestor(ctx, b.Source, gen.Source)
		if err != nil {
			return driver.StreamHeader{}, nil, err
		}
		if !ok {
			return driver.StreamHeader{}, nil, fmt.Errorf("%w: generation %d of %q is not in the history of generation %d (an import started a new lineage since): export generation %d in full", driver.ErrInvalid, base, project, gen.Number, gen.Number)
		}
		h.Base, from = b.Number, b.Source
		snaps = append(snaps, b.Source)
	}
	if h.GUID, err = s.guid(ctx, gen.Source); err != nil {
		return driver.StreamHeader{}, nil, err
	}
	if from != "" {
		if h.BaseGUID, err = s.guid(ctx, from); err != nil {
			return driver.StreamHeader{}, nil, err
		}
	}
	log := s.log.WithFields(logrus.Fields{"project": project, "generation": gen.Number, "base": h.Base, "dataset": gen.Source})
	write, err := s.heldSend(ctx, log, snaps, func(ctx context.Context, w io.Writer) error { return s.zfs.Send(ctx, w, gen.Source, from) })
	return h, write, err
}

// heldSend holds snaps and returns the function that runs send to write their stream and then
// releases the holds (with w nil, it only releases them).
func (s *Store) heldSend(ctx context.Context, log *logrus.Entry, snaps []string, send func(context.Context, io.Writer) error) (func(context.Context, io.Writer) error, error) {
	tag := exportHoldPrefix + strconv.FormatInt(time.Now().UnixNano(), 36)
	if err := s.zfs.Hold(ctx, tag, snaps...); err != nil {
		return nil, mapErr(err)
	}
	log = log.WithField("hold", tag)
	return func(ctx context.Context, w io.Writer) error {
		defer func() {
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
			defer cancel()
			if err := s.zfs.Release(rctx, tag, snaps...); err != nil {
				log.WithError(err).Error("could not release the export's holds; the next start releases them")
			}
		}()
		if w == nil { // the caller gave up before the stream: only the holds go
			return nil
		}
		s.cfg.Faults.Hit("export:after-hold")
		return mapErr(send(ctx, s.cfg.Faults.Writer("export:mid-stream", w)))
	}, nil
}

// ExportResume implements driver.Resumer. The token comes from the other host: before anything
// is sent it must name a generation snapshot of this project here, by name and guid.
func (s *Store) ExportResume(ctx context.Context, project, token string) (driver.StreamHeader, func(context.Context, io.Writer) error, error) {
	if err := driver.ValidateProject(project); err != nil {
		return driver.StreamHeader{}, nil, err
	}
	info, err := s.zfs.DescribeResumeToken(ctx, token)
	if err != nil {
		return driver.StreamHeader{}, nil, fmt.Errorf("%w: the resume token does not decode here: %v", driver.ErrInvalid, err)
	}
	if !inside(s.projectDataset(project), info.ToName) {
		return driver.StreamHeader{}, nil, fmt.Errorf("%w: the resume token names %s, which is not a generation of golden %q on this host", driver.ErrInvalid, info.ToName, project)
	}
	ps, err := s.projects(ctx, project)
	if err != nil {
		return driver.StreamHeader{}, nil, err
	}
	p := ps[project]
	if p == nil {
		return driver.StreamHeader{}, nil, driver.GoldenMissingError(project)
	}
	gens := p.generations()
	byGUID := func(guid string) *driver.Generation {
		for i := range gens {
			if gens[i].GUID == guid {
				return &gens[i]
			}
		}
		return nil
	}
	gen := byGUID(info.ToGUID)
	switch {
	case gen == nil:
		return driver.StreamHeader{}, nil, fmt.Errorf("%w: the generation it resumes (guid %s) is gone from golden %q here", driver.ErrStaleToken, info.ToGUID, project)
	case gen.Source != info.ToName:
		// zfs send -t finds the snapshot by the name in the token.
		return driver.StreamHeader{}, nil, fmt.Errorf("%w: generation %d moved from %s to %s (a promotion re-rooted it)", driver.ErrStaleToken, gen.Number, info.ToName, gen.Source)
	}
	h := driver.StreamHeader{Kind: p.kind, Generation: gen.Number, GUID: gen.GUID, Resume: true}
	snaps := []string{gen.Source}
	if info.FromGUID != "" {
		b := byGUID(info.FromGUID)
		if b == nil {
			return driver.StreamHeader{}, nil, fmt.Errorf("%w: the generation it is incremental from (guid %s) is gone from golden %q here", driver.ErrStaleToken, info.FromGUID, project)
		}
		h.Base, h.BaseGUID = b.Number, b.GUID
		snaps = append(snaps, b.Source)
	}
	log := s.log.WithFields(logrus.Fields{"project": project, "generation": gen.Number, "base": h.Base, "dataset": gen.Source, "resume": true})
	write, err := s.heldSend(ctx, log, snaps, func(ctx context.Context, w io.Writer) error { return s.zfs.SendResume(ctx, w, token) })
	return h, write, err
}

func findGeneration(gens []driver.Generation, n int) *driver.Generation {
	for i := range gens {
		if gens[i].Number == n {
			return &gens[i]
		}
	}
	return nil
}

func (s *Store) guid(ctx context.Context, snapshot string) (string, error) {
	row, err := s.zfs.Get(ctx, snapshot, "guid")
	if err != nil {
		return "", mapErr(err)
	}
	if row["guid"] == "" {
		return "", fmt.Errorf("%s has no guid", snapshot)
	}
	return row["guid"], nil
}

// ancestor reports whether the snapshot from is in the history of the snapshot to: on to's own
// dataset, or on one of its origins, which is what zfs send -i can start from.
func (s *Store) ancestor(ctx context.Context, from, to string) (bool, error) {
	fromDS, _, _ := strings.Cut(from, "@")
	ds, _, _ := strings.Cut(to, "@")
	for i := 0; i < 16 && ds != ""; i++ { // a bound on a chain ZFS keeps finite anyway
		if ds == fromDS {
			return true, nil
		}
		row, err := s.zfs.Get(ctx, ds, "origin")
		if err != nil {
			return false, mapErr(err)
		}
		ds, _, _ = strings.Cut(row["origin"], "@")
	}
	return false, nil
}

// ReceiveGolden implements driver.Transferer.
func (s *Store) ReceiveGolden(ctx context.Context, h driver.StreamHeader, r io.Reader) (driver.Generation, error) {
	if err := driver.ValidateProject(h.Project); err != nil {
		return driver.Generation{}, err
	}
	defer s.goldensChanged()
	ps, err := s.projects(ctx, h.Project)
	if err != nil {
		return driver.Generation{}, err
	}
	var gens []driver.Generation
	if p := ps[h.Project]; p != nil {
		if p.kind != h.Kind {
			return driver.Generation{}, driver.KindMismatchError(h.Project, p.kind, h.Kind)
		}
		gens = p.generations()
		if g := findGeneration(gens, h.Generation); g != nil {
			guid, err := s.guid(ctx, g.Source)
			if err != nil {
				return driver.Generation{}, err
			}
			if guid != h.GUID {
				return driver.Generation{}, diverged(h.Project, h.Generation, guid, h.GUID)
			}
			return *g, nil // already here: a repeated transfer changes nothing
		}
		if len(gens) > 0 && gens[len(gens)-1].Number >= h.Generation {
			m := gens[len(gens)-1].Number
			return driver.Generation{}, fmt.Errorf("%w: golden %q here already has generation %d, newer than the stream's %d, which it lacks: its history diverged from the sender's (generation numbers are given per host); remove the golden here, or receive into another project", driver.ErrGenerationInUse, h.Project, m, h.Generation)
		}
	}
	var parts []*lineage
	if p := ps[h.Project]; p != nil {
		for _, l := range p.lineages {
			if l.token != "" {
				parts = append(parts, l)
			}
		}
	}
	var resumeInto string
	if h.Resume {
		for _, pt := range parts {
			if pt.first == h.Generation {
				resumeInto = pt.name
			}
		}
		if resumeInto == "" {
			return driver.Generation{}, fmt.Errorf("%w: the stream resumes a receive of generation %d of %q that this host no longer holds (a later transfer replaced it, or it was removed): send it again without --resume", driver.ErrInvalid, h.Generation, h.Project)
		}
	}
	var origin string
	if h.Base > 0 {
		b := findGeneration(gens, h.Base)
		if b == nil {
			return driver.Generation{}, fmt.Errorf("%w: the stream is incremental from generation %d of %q, which this host does not have: send it in full (export without --since)", driver.ErrNotFound, h.Base, h.Project)
		}
		guid, err := s.guid(ctx, b.Source)
		if err != nil {
			return driver.Generation{}, err
		}
		if guid != h.BaseGUID {
			return driver.Generation{}, diverged(h.Project, h.Base, guid, h.BaseGUID)
		}
		origin = b.Source
	}
	// One partial receive per project: a transfer that does not resume it replaces it.
	for _, pt := range parts {
		if pt.name != resumeInto {
			s.log.WithFields(logrus.Fields{"project": h.Project, "dataset": pt.name, "generation": pt.first}).Info("dropping a partial receive that this transfer replaces")
			if err := s.destroy(ctx, pt.name, true); err != nil {
				return driver.Generation{}, err
			}
		}
	}
	created := ps[h.Project] == nil
	p, err := s.ensureProject(ctx, ps, h.Project, h.Kind)
	if err != nil {
		return driver.Generation{}, err
	}
	ds := s.projectDataset(p.name) + "/g" + strconv.Itoa(h.Generation)
	log := s.log.WithFields(logrus.Fields{"project": p.name, "dataset": ds, "generation": h.Generation, "base": h.Base, "resume": h.Resume})
	// fail destroys what this receive made: the new lineage, and the project's container when
	// the receive made that too (nothing of a refused stream may stay, not even a name).
	fail := func(err error) (driver.Generation, error) {
		s.dropReceived(ctx, log, ds, true)
		if created {
			s.dropReceived(ctx, log, s.projectDataset(p.name), false)
		}
		return driver.Generation{}, err
	}
	// -o wins over any property the stream carries: a stream sent with its properties could
	// otherwise bring a mountpoint outside the parent, or dedup back.
	props := zfsutil.Props{propState: "receiving", propKind: string(h.Kind), "dedup": "off", "compression": s.cfg.Compression}
	if h.Kind == driver.KindFS {
		props["mountpoint"] = "legacy" // as an import's lineage: zgolden mounts its clones itself
	}
	in := s.cfg.Faults.Reader("receive:mid-stream", r)
	var rerr error
	if h.Resume {
		rerr = s.zfs.Receive(ctx, in, ds, nil, "") // the partial receive has its origin already
	} else {
		rerr = s.zfs.Receive(ctx, in, ds, props, origin)
	}
	if rerr != nil {
		// What arrived stays for a resume when ZFS saved it, unless the pool is out of room,
		// where keeping it would only hold the space that is missing.
		tctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
		token, _ := s.zfs.ResumeToken(tctx, ds)
		cancel()
		if token == "" || errors.Is(rerr, zfsutil.ErrNoSpace) {
			return fail(receiveErr(rerr))
		}
		log.WithError(rerr).Warn("kept the partial receive: the next transfer of this generation resumes it")
		return driver.Generation{}, fmt.Errorf("%w: the stream ended early or is corrupt; what arrived is kept, invisible to Creates, and the next transfer of generation %d resumes it (`zgolden golden push` and `pull` do so by themselves; for a stream carried by hand, `zgolden golden ls --json` here shows the token, as Partial, for `zgolden golden export --resume`; any other transfer into %s replaces it): %v", driver.ErrInvalid, h.Generation, p.name, rerr)
	}
	if h.Resume {
		// A resumed receive takes no -o: whether the first attempt's properties reached the
		// partial dataset differs between releases, so they are set now.
		if err := s.zfs.Set(ctx, ds, props); err != nil {
			return fail(mapErr(err))
		}
		row, err := s.zfs.Get(ctx, ds, "origin")
		if err != nil {
			return fail(mapErr(err))
		}
		if o := row["origin"]; o != "-" {
			origin = o
		}
	}
	snap := genSnapshot(ds, h.Generation)
	if guid, err := s.guid(ctx, snap); err != nil || guid != h.GUID {
		// The stream's own snapshot is not the generation its header promised.
		return fail(fmt.Errorf("%w: the stream did not hold generation %d as its header said (received %s: %v, guid %q, want %q)", driver.ErrInvalid, h.Generation, snap, err, guid, h.GUID))
	}
	if err := s.checkReceived(ctx, ds, snap, h.Kind); err != nil {
		return fail(err)
	}
	s.cfg.Faults.Hit("receive:after-stream")
	if h.Kind == driver.KindBlock {
		if err := s.checkMounts(ctx, ds, filepath.Join(s.cfg.WorkDir, "receive-"+p.name+"-"+strconv.Itoa(h.Generation))); err != nil {
			return fail(err)
		}
	}
	// The completion marker: from here the generation is visible, and a crash rolls forward.
	if err := s.zfs.Set(ctx, ds, zfsutil.Props{propState: "ready"}); err != nil {
		return fail(mapErr(err))
	}
	s.cfg.Faults.Hit("receive:after-ready")
	if origin != "" {
		// A clone of an older lineage, as a promotion's new lineage is: make it the root.
		if err := s.reroot(ctx, log, ds); err != nil {
			return driver.Generation{}, err
		}
	}
	log.Info("golden generation received")
	return s.generation(ctx, p.name, h.Generation)
}

// checkReceived refuses a receive that made anything but one dataset of the header's type with
// the one snapshot of its generation: a replication stream (zfs send -R) would bring a dataset's
// every snapshot, or children, none of which zgolden made or tracks.
func (s *Store) checkReceived(ctx context.Context, ds, snap string, kind driver.Kind) error {
	rows, err := s.zfs.List(ctx, ds, []string{"filesystem", "volume", "snapshot"}, []string{"type"})
	if err != nil {
		return mapErr(err)
	}
	want := map[driver.Kind]string{driver.KindBlock: "volume", driver.KindFS: "filesystem"}[kind]
	for _, r := range rows {
		switch {
		case r["name"] == ds && r["type"] == want, r["name"] == snap:
		default:
			return fmt.Errorf("%w: the stream made %s (%s) beside generation %s: a golden stream carries one snapshot of one %s, as zgolden golden export writes it (not zfs send -R)", driver.ErrInvalid, r["name"], r["type"], snap, want)
		}
	}
	return nil
}

// checkMounts mounts the new lineage's XFS read-only at dir and unmounts it: a generation whose
// filesystem this host's kernel refuses (features of a newer mkfs.xfs, see "XFS features" in
// docs/design-facts.md) must never become visible to Creates.
func (s *Store) checkMounts(ctx context.Context, ds, dir string) error {
	dev, err := s.zfs.WaitDevice(ctx, ds, s.cfg.DeviceTimeout)
	if err != nil {
		return err
	}
	if err := xfsutil.Mount(ctx, dev, dir, []string{"ro", "norecovery", "nouuid"}); err != nil {
		_ = os.Remove(dir)
		return fmt.Errorf("%w: the received generation's XFS does not mount on this host's kernel: %v (was it made by a zgolden with another feature set?)", driver.ErrInvalid, err)
	}
	uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	defer cancel()
	if err := xfsutil.UnmountRetry(uctx, dir, 10); err != nil {
		return mapErr(err)
	}
	_ = os.Remove(dir)
	return nil
}

// dropReceived destroys a dataset a failed receive made, on its own bounded context: a lineage
// with its snapshots (recursive), or a project's container alone (not recursive, so one that
// holds anything else stays).
func (s *Store) dropReceived(ctx context.Context, log *logrus.Entry, ds string, recursive bool) {
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
	defer cancel()
	if err := s.destroy(dctx, ds, recursive); err != nil {
		log.WithError(err).Error("could not destroy a failed receive; the next start wipes it")
	}
}

func diverged(project string, n int, here, stream string) error {
	return fmt.Errorf("%w: generation %d of %q here (guid %s) is not the sender's (guid %s): the two hosts' histories diverged; remove the golden here, or receive into another project", driver.ErrGenerationInUse, n, project, here, stream)
}

// receiveErr says what a failed zfs receive means for the user. Nothing of the stream is kept
// either way (see ReceiveGolden).
func receiveErr(err error) error {
	msg := strings.ToLower(err.Error())
	switch {
	case errors.Is(err, zfsutil.ErrNoSpace):
		return fmt.Errorf("%w: the pool, or a quota on zgolden's parent dataset, has no room for the stream, and nothing of the stream was kept: free space here (remove volumes, `zgolden golden reclaim`) and send it again: %v", driver.ErrNoSpace, err)
	case strings.Contains(msg, "invalid backup stream"), strings.Contains(msg, "checksum mismatch"),
		strings.Contains(msg, "incomplete stream"), strings.Contains(msg, "premature eof"),
		strings.Contains(msg, "bad magic"), strings.Contains(msg, "invalid stream"),
		strings.Contains(msg, "stream is corrupt"), strings.Contains(msg, "input/output error"):
		return fmt.Errorf("%w: the stream is truncated or corrupt, and nothing of it was kept: %v", driver.ErrInvalid, err)
	}
	return fmt.Errorf("zfs receive failed, and nothing of the stream was kept: %w", mapErr(err))
}

// held reports whether snapshot carries a user hold.
func (s *Store) held(ctx context.Context, snapshot string) bool {
	row, err := s.zfs.Get(ctx, snapshot, "userrefs")
	return err == nil && row.Uint("userrefs") > 0
}

// releaseExportHolds releases the holds of exports a crash interrupted (Load): no export runs
// before the store is open.
func (s *Store) releaseExportHolds(ctx context.Context) error {
	rows, err := s.zfs.List(ctx, s.goldenRoot(), []string{"snapshot"}, []string{"userrefs"})
	if errors.Is(err, zfsutil.ErrNotFound) {
		return nil
	}
	if err != nil {
		return mapErr(err)
	}
	for _, r := range rows {
		if r.Uint("userrefs") == 0 {
			continue
		}
		tags, err := s.zfs.Holds(ctx, r["name"])
		if err != nil {
			return mapErr(err)
		}
		for _, tag := range tags {
			if strings.HasPrefix(tag, exportHoldPrefix) {
				s.log.WithFields(logrus.Fields{"dataset": r["name"], "hold": tag}).Warn("releasing the hold of an export a restart interrupted")
				if err := s.zfs.Release(ctx, tag, r["name"]); err != nil {
					return mapErr(err)
				}
			}
		}
	}
	return nil
}
