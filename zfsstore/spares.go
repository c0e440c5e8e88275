package zfsstore

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/zfsutil"
)

// Warm spares: clones made ahead of time, so a Create on a busy pool runs no zfs command.
//
// Every zfs clone waits for a transaction group to sync (docs/design-facts.md, "Transaction
// groups"), which under heavy write load took minutes in the guest. With Config.Spares > 0 a
// worker keeps that many clones of each block project's newest generation under PARENT/spare,
// each with its device made. A Create of that project's newest generation (no -o size, no
// -o generation of another) claims one: it writes a claim record durably (records.go: one
// overwrite and an fdatasync, no journal commit), and returns. A finisher then sets the volume's
// creation time and renames the spare to PARENT/vol/NAME in the background; a mounted zvol can be
// renamed, its device keeps its number.
//
// On a busy pool every sync task waits a transaction group or two, and sync tasks that wait
// together share them: ten clones issued at once take about as long as one. So the worker makes
// a project's missing spares side by side (up to spareParallel at a time), and finishes claims
// beside them, rather than one after another. And a Create that finds no spare ready, while the
// worker is making one of its generation that no other Create waits for (or a claim has queued
// one), waits for that one (bounded by its deadline) instead of starting a clone of its own: that
// clone started earlier, so it is ready no later, and the pool has one clone less to do. A Create
// that finds every spare being made already awaited clones, as its own clone then shares the
// transaction groups.
//
// The truth, and when each part of it wins:
//   - A spare is a dataset under PARENT/spare whose origin is a generation's snapshot,
//     PARENT/golden/PROJECT/gK@genN: that names its project and generation. It is a bare clone,
//     a zfs clone with no property (dedup and compression it inherits from PARENT/spare), which
//     is one sync task on every release, where a clone with properties is two before 2.4. So a
//     spare exists whole or not at all, and nothing but its origin needs reading. The volume's
//     own properties are set by the finisher, in the zfs set before its rename (finishLocked).
//     Spares made before this carry zgolden:* properties too; the origin wins.
//   - A claim record (records.go, key claim/NAME) names the spare a volume was given. While the spare
//     exists, the record wins: that spare is volume NAME, whatever ZFS calls it. Once the spare
//     is gone, the record is spent: if PARENT/vol/NAME exists the rename happened, and if not the
//     volume was removed (Remove moves the spare to the trash before it deletes the record). Load
//     deletes spent records.
//   - A Create returns only after its record is durable. A host crash before that means the
//     Create never returned (a torn record is no record), and the spare is still a spare.
//
// Locks: spares.mu guards the maps and the spares being made, and is never held across a zfs
// command or I/O (the worker hands a spare to a waiting Create under it, on a channel that cannot
// block). A claim's mu is held by the finisher for its rename and by Promote of that volume, so it
// never sees the volume under a name that is changing; a Remove takes it only when no rename is
// under way, and otherwise records the removal beside the rename (removal.go, removeDuring),
// because the rename can last transaction groups on a busy pool and Docker gives a Remove a
// minute. Mount and Usage do not take it (Mount uses the device, which a rename does not change).
// make is held by the worker for a whole pass and by RemoveGeneration and RemoveGolden from
// retiring the spares until the destroy is done, so no
// spare of a generation being destroyed is made behind their back.
type spareSet struct {
	mu     sync.Mutex
	ready  map[string][]spare // project -> spares not claimed
	claims map[string]*claim  // volume name -> its claim, until the rename is done
	making []*making          // spares queued by a claim or being made by the worker
	open   bool               // the worker runs: a claim may queue its replacement
	lastID int64              // the last spare's name, as a number (spareName)
	wake   chan struct{}
	make   sync.Mutex
	start  sync.Once // the worker starts at the end of the first Load
	stop   context.CancelFunc
	done   chan struct{}
}

// stopWorker stops the spare worker, if it started, waiting for it until ctx is done.
func (s *Store) stopWorker(ctx context.Context) error {
	s.spares.start.Do(func() {}) // a Load after Close starts nothing
	if s.spares.stop == nil {
		return nil
	}
	s.spares.stop()
	select {
	case <-s.spares.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

type spare struct {
	ds  string
	gen int
	dev string // its /dev/zdN, when known
}

// making is a spare the worker is making. waiter is nil until a Create waits for it (awaitSpare);
// the worker then hands the spare over on it instead of putting it with the ready ones, or closes
// it if the spare could not be made. Both fields are guarded by spares.mu, and the worker sends
// under it, so a waiter that gives up under spares.mu knows for sure whether it was handed one.
//
// A claim queues its replacement at once (queueReplacement), unstarted, for the worker to start at
// its next look: the worker first lists the projects, which under load takes seconds, and a Create
// that comes meanwhile must find a spare to wait for.
type making struct {
	project string
	gen     int
	waiter  chan spare
	started bool
}

// spareParallel bounds the spares made at once: they share transaction groups, but each is a zfs
// process, a device for udev and an XFS mount.
const spareParallel = 4

// fillFor bounds how long one pass of the worker starts new spares (fillSpares).
const fillFor = time.Minute

// claimRecord is the durable claim, the record claim/NAME (records.go).
type claimRecord struct {
	Name       string `json:"name"`
	Dataset    string `json:"dataset"`
	Golden     string `json:"golden"`
	Generation int    `json:"generation"`
	Created    int64  `json:"created"`
	Size       uint64 `json:"size"`
}

type claim struct {
	claimRecord
	dev  string
	mu   sync.Mutex
	done bool // renamed or removed; the record is deleted

	// rm orders a Remove against the finisher's rename without making the Remove wait for it:
	// the rename is two sync tasks, which on a busy pool last transaction groups. rm is held
	// across the removal record's write and fsync at most, never across a zfs command.
	rm       sync.Mutex
	renaming bool   // the finisher's set and rename are under way
	removed  bool   // a Remove took the volume; the finisher must not start, or hands it over
	handover string // the dataset a failed hand-over left to retry (handOverRemoved)
}

func (s *Store) spareRoot() string { return s.cfg.Parent + "/spare" }

// dsOf is the dataset that holds volume name now.
func (s *Store) dsOf(name string) string {
	s.spares.mu.Lock()
	defer s.spares.mu.Unlock()
	if c := s.spares.claims[name]; c != nil {
		return c.Dataset
	}
	return s.volDataset(name)
}

func (s *Store) claimOf(name string) *claim {
	s.spares.mu.Lock()
	defer s.spares.mu.Unlock()
	return s.spares.claims[name]
}

// claimedBy returns the volume a spare dataset was claimed for, or "".
func (s *Store) claimedBy(ds string) string {
	s.spares.mu.Lock()
	defer s.spares.mu.Unlock()
	for name, c := range s.spares.claims {
		if c.Dataset == ds {
			return name
		}
	}
	return ""
}

func (s *Store) kickSpares() {
	select {
	case s.spares.wake <- struct{}{}:
	default:
	}
}

// takeSpare removes and returns a ready spare of project's generation gen, or nil.
func (s *Store) takeSpare(project string, gen int) *spare {
	s.spares.mu.Lock()
	defer s.spares.mu.Unlock()
	list := s.spares.ready[project]
	for i, sp := range list {
		if sp.gen == gen {
			s.spares.ready[project] = append(list[:i:i], list[i+1:]...)
			return &sp
		}
	}
	return nil
}

func (s *Store) putSpare(project string, sp spare) {
	s.spares.mu.Lock()
	defer s.spares.mu.Unlock()
	s.spares.ready[project] = append(s.spares.ready[project], sp)
}

// claimSpare gives volume spec.Name a ready spare of gen, if there is one: the Create's whole cost
// is the record's write and fsyncs. ok is false when there was none (or the record could not be
// written), and the caller waits for one being made (awaitable) or clones.
func (s *Store) claimSpare(spec driver.Spec, gen *driver.Generation, size uint64, log *logrus.Entry) (driver.Volume, bool) {
	if s.cfg.Spares <= 0 || s.cfg.RecordDir == "" {
		return driver.Volume{}, false
	}
	sp := s.takeSpare(spec.Golden, gen.Number)
	if sp == nil {
		s.kickSpares()
		return driver.Volume{}, false
	}
	return s.claimWith(spec, *sp, size, log)
}

// claimWith records sp as volume spec.Name's. When the record cannot be written, sp goes back to
// the ready spares and ok is false.
func (s *Store) claimWith(spec driver.Spec, sp spare, size uint64, log *logrus.Entry) (driver.Volume, bool) {
	now := time.Now().UTC()
	rec := claimRecord{Name: spec.Name, Dataset: sp.ds, Golden: spec.Golden, Generation: sp.gen, Created: now.Unix(), Size: size}
	err := s.writeRecord(rec)
	recordTook := time.Since(now)
	if err != nil {
		log.WithError(err).Warn("could not record a spare's claim; cloning instead")
		s.putSpare(spec.Golden, sp)
		return driver.Volume{}, false
	}
	c := &claim{claimRecord: rec, dev: sp.dev}
	s.spares.mu.Lock()
	s.spares.claims[spec.Name] = c
	s.spares.mu.Unlock()
	s.cfg.Faults.Hit("create:after-claim")
	s.queueReplacement(spec.Golden, sp.gen)
	s.kickSpares()
	log.WithFields(logrus.Fields{"spare": sp.ds, "record_took": recordTook.Round(time.Microsecond).String()}).Debug("claimed a spare")
	return c.volume(), true
}

// awaitable returns a spare of project's generation gen that the worker is making and no Create
// waits for yet, marking it as awaited; nil when there is none.
func (s *Store) awaitable(project string, gen int) *making {
	if s.cfg.Spares <= 0 || s.cfg.RecordDir == "" {
		return nil
	}
	s.spares.mu.Lock()
	defer s.spares.mu.Unlock()
	for _, m := range s.spares.making {
		if m.project == project && m.gen == gen && m.waiter == nil {
			m.waiter = make(chan spare, 1)
			return m
		}
	}
	return nil
}

// awaitSpare waits for m (from awaitable) and claims it for spec.Name. ok is false, with a nil
// error, when the worker could not make it (or its claim could not be recorded): the caller then
// clones. A ctx done first is an error, and m, once made, goes to the ready spares.
func (s *Store) awaitSpare(ctx context.Context, m *making, spec driver.Spec, size uint64, log *logrus.Entry) (v driver.Volume, ok bool, err error) {
	// Creates waiting for a spare are Creates waiting on the pool: the trash worker yields.
	s.cloning.Add(1)
	defer s.cloning.Add(-1)
	start := time.Now()
	ch := m.waiter // set by awaitable for this Create; only its timeout below clears it
	var sp spare
	var made bool
	select {
	case sp, made = <-ch:
	case <-ctx.Done():
		s.spares.mu.Lock()
		select {
		case sp, made = <-ch: // handed over just now
		default:
			m.waiter = nil // the worker puts it with the ready spares
		}
		s.spares.mu.Unlock()
		if !made {
			return driver.Volume{}, false, fmt.Errorf("waited %s for a spare of %s generation %d being made: %w",
				time.Since(start).Round(time.Millisecond), spec.Golden, m.gen, ctx.Err())
		}
	}
	if !made {
		log.Info("the spare this Create waited for could not be made; cloning instead")
		return driver.Volume{}, false, nil
	}
	log.WithFields(logrus.Fields{"spare": sp.ds, "waited": time.Since(start).Round(time.Millisecond).String()}).Info("waited for a spare being made")
	// Handed over, not yet recorded: a crash here leaves a ready spare, and a Create that never
	// returned.
	s.cfg.Faults.Hit("create:after-wait")
	v, ok = s.claimWith(spec, sp, size, log)
	return v, ok, nil
}

func (c *claim) volume() driver.Volume {
	return driver.Volume{
		Name: c.Name, Kind: driver.KindBlock, Golden: c.Golden, Generation: c.Generation,
		CreatedAt: time.Unix(c.Created, 0).UTC(), Size: c.Size, Source: c.Dataset,
	}
}

// finishClaim renames a claimed spare to its volume's name, unless that is done; Remove and
// Promote call it (under the volume's driver lock) before they touch the dataset.
func (s *Store) finishClaim(ctx context.Context, name string) error {
	c := s.claimOf(name)
	if c == nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return s.finishLocked(ctx, c)
}

func (s *Store) finishLocked(ctx context.Context, c *claim) error {
	if c.done {
		return nil
	}
	c.rm.Lock()
	if c.removed { // Remove has it, and records its removal under c.mu once this returns
		retry := c.handover
		c.rm.Unlock()
		if retry != "" {
			return s.handOverRemoved(ctx, c, retry, errRetry)
		}
		return nil
	}
	c.renaming = true
	c.rm.Unlock()
	s.cfg.Faults.Pause(ctx, "claim:renaming")
	dst := s.volDataset(c.Name)
	log := s.log.WithFields(logrus.Fields{"volume": c.Name, "dataset": dst, "spare": c.Dataset})
	// A spare is a bare clone: the volume gets its properties here, in the one sync task that
	// a volume cloned with them would have spent on them before 2.4, and off Create's path.
	err := s.zfs.Set(ctx, c.Dataset, zfsutil.Props{
		propKind: string(driver.KindBlock), propGolden: c.Golden, propGeneration: strconv.Itoa(c.Generation),
		propState: "ready", propCreated: strconv.FormatInt(c.Created, 10),
	})
	if err == nil {
		err = s.retryBusy(ctx, func() error { return s.zfs.Rename(ctx, c.Dataset, dst) })
	}
	if err == nil {
		held.rename(c.Dataset, dst)
		s.renameHint(c.Dataset, dst)
		s.cfg.Faults.Hit("claim:after-rename")
	}
	c.rm.Lock()
	c.renaming = false
	removed := c.removed
	c.rm.Unlock()
	if removed {
		return s.handOverRemoved(ctx, c, dst, err)
	}
	if err != nil {
		return mapErr(err)
	}
	s.endClaim(c)
	log.Debug("a claimed spare has its volume's name")
	return nil
}

// handOverRemoved finishes a Remove that came while the finisher renamed the volume's spare
// (removeDuring): it gives the trash worker whichever dataset holds the volume now, recording
// it under that name first, and ends the claim. renameErr is the rename's outcome.
func (s *Store) handOverRemoved(ctx context.Context, c *claim, dst string, renameErr error) error {
	ds := dst
	if renameErr != nil {
		// The rename failed, or was abandoned at its deadline and may still land: ask ZFS.
		ok, err := s.zfs.Exists(ctx, c.Dataset)
		if err != nil {
			c.rm.Lock()
			c.handover = dst // asked again at the worker's next pass
			c.rm.Unlock()
			return mapErr(err)
		}
		if ok {
			ds = c.Dataset
		}
	}
	log := s.log.WithFields(logrus.Fields{"volume": c.Name, "dataset": ds, "spare": c.Dataset})
	if ds != c.Dataset {
		// Record dst before the spare's record goes: a crash between them leaves two records
		// that both name dst (loadRemovals), never none.
		err := s.writeRemoval(removalRecord{Name: c.Name, Dataset: ds, Removed: time.Now().Unix()})
		if err == nil {
			s.cfg.Faults.Hit("remove:after-handover-record")
			err = s.dropRemovalRecord(c.Dataset)
		}
		if err != nil {
			// Its record still names the spare and then dst, which the next Load hands over;
			// until then the claim stays, so no Create of the name can take dst's place.
			c.rm.Lock()
			c.handover = ds
			c.rm.Unlock()
			return fmt.Errorf("re-record the removal of %s as %s: %w", c.Name, ds, err)
		}
	}
	// The trash has it before the claim goes, so that at no moment does a dataset under
	// PARENT/spare belong to neither (adoptSpares would take it for a stray spare).
	s.trash.mu.Lock()
	s.trash.pending[ds] = 0
	s.trash.records[ds] = true
	s.trash.mu.Unlock()
	s.endClaim(c)
	s.kickTrash()
	log.Debug("removed while its spare was renamed; the dataset is destroyed in the background")
	return nil
}

// errRetry makes a retried hand-over ask ZFS again where the volume is.
var errRetry = errors.New("hand-over retried")

// waitRenaming waits until a finisher renaming the spare of a removed volume of this name has
// handed it to the trash worker, so that a Create of the name finds the old dataset as a
// pending removal (clearRemoval) and never clones into a name a rename is about to take. A
// Create only comes for a name the driver has no volume of, so any claim of it is a removed one.
func (s *Store) waitRenaming(name string) error {
	c := s.claimOf(name)
	if c == nil {
		return nil
	}
	c.mu.Lock()
	c.mu.Unlock() //nolint:staticcheck // a barrier: the finisher holds mu across its rename
	if s.claimOf(name) == c {
		return fmt.Errorf("%w: the removal of an earlier volume %s is still being recorded (its spare %s was being renamed); retry shortly", driver.ErrBusy, name, c.Dataset)
	}
	return nil
}

// endClaim forgets a claim whose spare was renamed or removed, and deletes its record.
func (s *Store) endClaim(c *claim) {
	c.done = true
	s.spares.mu.Lock()
	if s.spares.claims[c.Name] == c {
		delete(s.spares.claims, c.Name)
	}
	s.spares.mu.Unlock()
	if err := s.deleteRecord(c.Name); err != nil {
		// Harmless: Load finds the spare gone and deletes the spent record.
		s.log.WithError(err).WithField("volume", c.Name).Warn("could not delete a spent claim record")
	}
}

// removeClaimed moves a volume that is still a claimed spare to the trash. handled is false when
// the volume had no pending claim, and the caller removes vol/NAME as usual.
func (s *Store) removeClaimed(ctx context.Context, name string) (handled bool, err error) {
	c := s.claimOf(name)
	if c == nil {
		return false, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done {
		return false, nil
	}
	dev := held.take(c.Dataset)
	if err := s.trashVolume(ctx, c.Dataset, name, dev); err != nil {
		if dev != nil {
			held.hold(c.Dataset, dev)
		}
		if errors.Is(err, zfsutil.ErrBusy) {
			return true, busy(err, c.Dataset)
		}
		return true, mapErr(err)
	}
	s.endClaim(c)
	return true, nil
}

// spareWorker finishes claims and keeps the spares stocked until ctx is done.
func (s *Store) spareWorker(ctx context.Context, done chan<- struct{}) {
	defer close(done)
	tick := time.NewTicker(15 * time.Second)
	defer tick.Stop()
	pickTick := time.NewTicker(pickMaxAge / 2)
	defer pickTick.Stop()
	s.spares.mu.Lock()
	s.spares.open = true
	s.spares.mu.Unlock()
	// Claims are finished beside the stocking, not before it, and a pass does not wait for them:
	// a Create needs the spares now, the renames (two sync tasks each) only tidy up, and both
	// kinds of sync task share the transaction groups.
	var finishing sync.WaitGroup
	finishIdle := make(chan struct{}, 1)
	finishIdle <- struct{}{}
	defer func() {
		finishing.Wait()
		s.spares.mu.Lock()
		s.spares.open = false // no claim queues a replacement after this
		s.spares.mu.Unlock()
		s.dropQueued(func(*making) bool { return true }) // their Creates clone
	}()
	for {
		select {
		case <-finishIdle:
			finishing.Go(func() {
				s.finishAll(ctx)
				finishIdle <- struct{}{}
			})
		default: // still renaming; the next pass starts it again
		}
		// With Spares 0 the pass only retires spares an earlier run made.
		if s.cfg.Spares > 0 || s.sparesTotal() > 0 {
			if err := s.stockSpares(ctx); err != nil && ctx.Err() == nil {
				s.log.WithError(err).Warn("could not make spare volumes; retrying")
			}
		}
		for waiting := true; waiting; {
			select {
			case <-ctx.Done():
				return
			case <-s.spares.wake:
				waiting = false
			case <-tick.C:
				waiting = false
			case <-pickTick.C:
				s.refreshPicks(ctx)
			}
		}
	}
}

// refreshPicks re-reads the pick (pickGeneration) of every project with a spare ready before it
// expires, so that a Create that claims a spare runs no zfs command at all: a pick older than
// pickMaxAge is read again on the Create's path, and under load that zfs list cost the bench
// ~0.45 s of a 0.5 s Create. It is a read, with no transaction group to wait for.
func (s *Store) refreshPicks(ctx context.Context) {
	for project := range s.sparesReady() {
		if _, _, _, err := s.pickGeneration(ctx, driver.Spec{Golden: project, Kind: driver.KindBlock}, true); err != nil && ctx.Err() == nil {
			s.log.WithError(err).WithField("project", project).Debug("could not refresh the pick of a project with spares")
		}
	}
}

func (s *Store) finishAll(ctx context.Context) {
	s.spares.mu.Lock()
	claims := make([]*claim, 0, len(s.spares.claims))
	for _, c := range s.spares.claims {
		claims = append(claims, c)
	}
	s.spares.mu.Unlock()
	parallel(len(claims), func(i int) {
		c := claims[i]
		if err := s.finishClaim(ctx, c.Name); err != nil && ctx.Err() == nil {
			s.log.WithError(err).WithFields(logrus.Fields{"volume": c.Name, "dataset": c.Dataset}).Warn("could not rename a claimed spare yet; retrying")
		}
	})
}

// parallel runs fn(0) ... fn(n-1), spareParallel at a time, and returns when all have.
func parallel(n int, fn func(i int)) {
	var wg sync.WaitGroup
	slots := make(chan struct{}, spareParallel)
	for i := range n {
		slots <- struct{}{}
		wg.Go(func() {
			defer func() { <-slots }()
			fn(i)
		})
	}
	wg.Wait()
}

// stockSpares makes each block project's spares of its newest generation, and retires spares of
// other generations, of projects that are gone, and beyond Spares (a lowered setting).
func (s *Store) stockSpares(ctx context.Context) error {
	s.spares.make.Lock()
	defer s.spares.make.Unlock()
	if err := s.adoptSpares(ctx); err != nil {
		return err
	}
	ps, _, err := s.projectsSizes(ctx, "", pickProps) // generations, not dependents: one zfs list a pass
	if err != nil {
		return err
	}
	newest := map[string]*driver.Generation{}
	for name, p := range ps {
		if p.kind != driver.KindBlock {
			continue
		}
		importing := false
		for _, l := range p.lineages {
			importing = importing || (l.state != "ready" && l.token == "")
		}
		if gens := p.generations(); len(gens) > 0 && !importing {
			g := gens[len(gens)-1]
			newest[name] = &g
		}
	}
	var stale []spare
	s.spares.mu.Lock()
	for project, list := range s.spares.ready {
		keep := list[:0]
		for _, sp := range list {
			if g := newest[project]; g != nil && g.Number == sp.gen && len(keep) < s.cfg.Spares {
				keep = append(keep, sp)
			} else {
				stale = append(stale, sp)
			}
		}
		s.spares.ready[project] = keep
	}
	s.spares.mu.Unlock()
	for _, sp := range stale {
		if err := s.destroy(ctx, sp.ds, true); err != nil {
			s.log.WithError(err).WithField("dataset", sp.ds).Warn("could not retire a spare of an older generation; it is retried at the next start")
		}
	}
	names := make([]string, 0, len(newest))
	for name := range newest {
		names = append(names, name)
	}
	sort.Strings(names)
	if err := s.fillSpares(ctx, names, newest); err != nil {
		return err
	}
	s.premountReady(ctx)
	return ctx.Err()
}

// adoptSpares puts with the ready spares any ready spare under PARENT/spare that this process
// does not know. A crash while a spare is being cloned leaves the zfs process running, and the
// kernel finishes its clone, which can land after the next start's Load has listed PARENT/spare:
// held by nobody until the start after. Adopted, it is a spare like any other, and the pass
// retires it if it is one too many or of an older generation. The caller holds spares.make, so no
// spare of this process is being cloned meanwhile.
func (s *Store) adoptSpares(ctx context.Context) error {
	// What this process knows, read before the listing: a claimed spare renamed after it is
	// then still known, and never taken for a stray.
	known := map[string]bool{}
	s.spares.mu.Lock()
	for _, list := range s.spares.ready {
		for _, sp := range list {
			known[sp.ds] = true
		}
	}
	for _, c := range s.spares.claims {
		known[c.Dataset] = true
	}
	s.spares.mu.Unlock()
	s.trash.mu.Lock()
	for ds := range s.trash.pending {
		known[ds] = true
	}
	s.trash.mu.Unlock()
	s.tomb.mu.Lock()
	for _, ds := range s.tomb.names {
		known[ds] = true
	}
	s.tomb.mu.Unlock()
	rows, err := s.listSpares(ctx)
	if err != nil {
		return err
	}
	for _, r := range rows {
		ds := r["name"]
		project, gen, ok := s.originGeneration(r["origin"])
		if ds == s.spareRoot() || known[ds] || !ok {
			continue // one of no generation is destroyed by the next Load
		}
		s.log.WithFields(logrus.Fields{"dataset": ds, "project": project, "generation": gen}).Warn("adopting a spare whose clone landed after the start (a crash interrupted its making)")
		s.putSpare(project, s.listedSpare(ctx, ds, gen))
	}
	return nil
}

// listSpares lists PARENT/spare and the datasets under it with their origin (originGeneration); none
// when PARENT/spare does not exist.
func (s *Store) listSpares(ctx context.Context) ([]zfsutil.Row, error) {
	rows, err := s.zfs.List(ctx, s.spareRoot(), []string{"volume"}, []string{"origin"})
	if errors.Is(err, zfsutil.ErrNotFound) {
		return nil, nil
	}
	return rows, mapErr(err)
}

// originGeneration reads the project and generation a spare or a bare volume (bare.go) was
// cloned from out of its origin, the generation snapshot PARENT/golden/PROJECT/gK@genN; ok is
// false for any other origin. A promotion's zfs promote moves snapshots between a project's
// lineages, never their names or projects, so the origin stays right for as long as the clone
// exists, unless the clone itself, or a fork of it, is promoted (bare.go).
func (s *Store) originGeneration(origin string) (project string, gen int, ok bool) {
	rel, ok := strings.CutPrefix(origin, s.goldenRoot()+"/")
	if !ok {
		return "", 0, false
	}
	lineage, snap, _ := strings.Cut(rel, "@")
	project, first, _ := strings.Cut(lineage, "/")
	n, err := strconv.Atoi(strings.TrimPrefix(snap, genPrefix))
	_, lerr := strconv.Atoi(strings.TrimPrefix(first, "g"))
	if err != nil || lerr != nil || n < 1 || !strings.HasPrefix(snap, genPrefix) || !strings.HasPrefix(first, "g") ||
		driver.ValidateProject(project) != nil {
		return "", 0, false
	}
	return project, n, true
}

// listedSpare is a ready spare found in a listing. Its device is waited for a second only: ""
// is fine, as deviceOf then waits by name.
func (s *Store) listedSpare(ctx context.Context, ds string, gen int) spare {
	dev, _ := s.zfs.WaitDevice(ctx, ds, time.Second)
	return spare{ds: ds, gen: gen, dev: dev}
}

// fillSpares makes spares until each project in names has Spares of generation newest[project],
// ready or being made. It starts one as soon as a claim or a hand-over leaves a project short
// (kickSpares wakes it), up to spareParallel at a time, and returns once none is being made. A
// spare that fails stops further starts; the others are waited for, and the errors returned.
//
// It starts spares for fillFor at most: the pass holds spares.make, which RemoveGeneration and
// RemoveGolden wait for, and reads the newest generations only at its start, so Creates that keep
// coming must not keep one pass going.
func (s *Store) fillSpares(ctx context.Context, names []string, newest map[string]*driver.Generation) error {
	done := make(chan error, spareParallel)
	running := 0
	var errs []error
	woken := false // a claim came meanwhile: the next pass finishes it (finishAll)
	until := time.Now().Add(fillFor)
	// Replacements queued for a generation that is no longer the newest, or a project gone, are
	// not made: their waiting Creates clone.
	s.dropQueued(func(m *making) bool { g := newest[m.project]; return g == nil || g.Number != m.gen })
	launch := func(m *making) {
		g := newest[m.project]
		running++
		go func() {
			if err := s.makeSpare(ctx, m, g); err != nil {
				done <- fmt.Errorf("spare of %s generation %d: %w", m.project, g.Number, err)
				return
			}
			done <- nil
		}()
	}
	for {
		starting := len(errs) == 0 && ctx.Err() == nil && time.Now().Before(until)
		for starting && running < spareParallel {
			m := s.startQueued(newest)
			if m == nil {
				break
			}
			launch(m)
		}
		for _, name := range names {
			for starting && running < spareParallel && s.stocked(name) < s.cfg.Spares {
				launch(s.startMaking(name, newest[name].Number))
			}
		}
		if running == 0 {
			if len(errs) > 0 {
				s.dropQueued(func(*making) bool { return true }) // their Creates clone
			} else if woken || !time.Now().Before(until) {
				s.kickSpares() // the next pass goes on where this one stopped
			}
			return errors.Join(errs...)
		}
		select {
		case err := <-done:
			running--
			if err != nil {
				errs = append(errs, err)
			}
		case <-s.spares.wake: // a claim: look again
			woken = true
		}
	}
}

// premountReady mounts ready spares that have no early mount (after a reboot, or one that
// failed before).
//
// It runs on every pass of the worker, and every volume keeps its early mount, so it does not
// scan them all (a scan opens each one's device): a ready spare whose hint holds has its early
// mount, and only a spare without one costs a scan, once per pass.
func (s *Store) premountReady(ctx context.Context) {
	s.spares.mu.Lock()
	var ready []spare
	for _, list := range s.spares.ready {
		for _, sp := range list {
			if sp.dev != "" {
				ready = append(ready, sp)
			}
		}
	}
	s.spares.mu.Unlock()
	var todo []spare
	var scanned map[string]string
	for _, sp := range ready {
		if s.hinted(sp.ds) != "" {
			continue
		}
		if scanned == nil {
			pm, err := s.premounts()
			if err != nil {
				return // a mount table not read is no reason to mount a spare twice
			}
			scanned = pm
		}
		if scanned[sp.ds] == "" {
			todo = append(todo, sp)
		}
	}
	for _, sp := range todo {
		s.premount(ctx, sp.ds, sp.dev)
		// A Create may have claimed it meanwhile, and its Mount mounted the device without
		// waiting for this one: that Mount did not bind it, so it goes, and the volume's
		// Unmount makes its own kept mount (premount.go, keepMounted).
		if !s.isReady(sp.ds) {
			if pm := s.premountOf(sp.ds); pm != "" {
				s.dropPremount(pm, s.log.WithField("dataset", sp.ds))
			}
		}
	}
}

// isReady says whether ds is a spare not claimed.
func (s *Store) isReady(ds string) bool {
	s.spares.mu.Lock()
	defer s.spares.mu.Unlock()
	for _, list := range s.spares.ready {
		for _, sp := range list {
			if sp.ds == ds {
				return true
			}
		}
	}
	return false
}

func (s *Store) sparesTotal() int {
	n := 0
	for _, k := range s.sparesReady() {
		n += k
	}
	return n
}

// spareName returns a new spare's dataset: the time, as a number unique in this process, since
// spares are made side by side.
func (s *Store) spareName() string {
	s.spares.mu.Lock()
	defer s.spares.mu.Unlock()
	s.spares.lastID = max(time.Now().UnixNano(), s.spares.lastID+1)
	return s.spareRoot() + "/" + strconv.FormatInt(s.spares.lastID, 36)
}

// queueReplacement queues a spare of project's generation gen for the worker to make, when the
// project has fewer than Spares ready or queued or being made, so that a Create that comes
// before the worker starts it can wait for it.
func (s *Store) queueReplacement(project string, gen int) {
	s.spares.mu.Lock()
	defer s.spares.mu.Unlock()
	if s.spares.open && s.stockedLocked(project) < s.cfg.Spares {
		s.spares.making = append(s.spares.making, &making{project: project, gen: gen})
	}
}

// startQueued marks a queued spare of a generation in newest started, and returns it; nil when
// none is queued.
func (s *Store) startQueued(newest map[string]*driver.Generation) *making {
	s.spares.mu.Lock()
	defer s.spares.mu.Unlock()
	for _, m := range s.spares.making {
		if g := newest[m.project]; !m.started && g != nil && g.Number == m.gen {
			m.started = true
			return m
		}
	}
	return nil
}

// dropQueued forgets the queued spares, not started, that drop says, and tells their waiting
// Creates, which clone instead.
func (s *Store) dropQueued(drop func(*making) bool) {
	s.spares.mu.Lock()
	defer s.spares.mu.Unlock()
	s.spares.making = slices.DeleteFunc(s.spares.making, func(m *making) bool {
		if m.started || !drop(m) {
			return false
		}
		if m.waiter != nil {
			close(m.waiter)
		}
		return true
	})
}

// startMaking registers a spare of project's generation gen as being made, before its goroutine
// starts, so that the next look of fillSpares counts it.
func (s *Store) startMaking(project string, gen int) *making {
	m := &making{project: project, gen: gen, started: true}
	s.spares.mu.Lock()
	s.spares.making = append(s.spares.making, m)
	s.spares.mu.Unlock()
	return m
}

// stocked counts project's spares ready, queued or being made: what fillSpares fills up to Spares.
func (s *Store) stocked(project string) int {
	s.spares.mu.Lock()
	defer s.spares.mu.Unlock()
	return s.stockedLocked(project)
}

func (s *Store) stockedLocked(project string) int {
	n := len(s.spares.ready[project])
	for _, m := range s.spares.making {
		if m.project == project {
			n++
		}
	}
	return n
}

// makeSpare makes the spare m (from startMaking), of generation g, and puts it with the ready
// ones, or hands it to the Create that waits for it (awaitSpare).
func (s *Store) makeSpare(ctx context.Context, m *making, g *driver.Generation) error {
	project := m.project
	ds := s.spareName()
	var made *spare
	defer func() {
		s.spares.mu.Lock()
		defer s.spares.mu.Unlock()
		s.spares.making = slices.DeleteFunc(s.spares.making, func(x *making) bool { return x == m })
		switch {
		case m.waiter != nil && made != nil:
			m.waiter <- *made
		case m.waiter != nil:
			close(m.waiter)
		case made != nil:
			s.spares.ready[project] = append(s.spares.ready[project], *made)
		}
	}()
	s.cfg.Faults.Pause(ctx, "spare:making")
	log := s.log.WithFields(logrus.Fields{"dataset": ds, "project": project, "generation": g.Number})
	s.swap.RLock() // the generation's snapshot must not move while it is cloned (see swap)
	// Bare: one sync task on every release (see spareSet); dedup and compression are inherited.
	err := s.zfs.Clone(ctx, g.Source, ds, nil)
	s.swap.RUnlock()
	if err != nil {
		s.cleanupLate(ds, ds, err, log)
		return mapErr(err)
	}
	s.cfg.Faults.Hit("spare:after-clone") // a spare with no property: the next Load reads its origin
	dev, err := s.zfs.WaitDevice(ctx, ds, s.cfg.DeviceTimeout)
	if err != nil {
		s.rollback(ctx, log, ds, ds)
		return err
	}
	s.premount(ctx, ds, dev)
	s.cfg.Faults.Hit("spare:after-mount") // mounted ahead, not yet counted: the next Load finds both
	made = &spare{ds: ds, gen: g.Number, dev: dev}
	log.Debug("made a spare volume")
	return nil
}

// retireSpares destroys the ready spares of project (of generation gen, or all when gen is 0),
// so that the generation or the golden can be destroyed. The caller holds spares.make, and keeps it until the generation or golden is gone: the worker
// would otherwise make a new spare of it in between, and that clone would block the destroy.
func (s *Store) retireSpares(ctx context.Context, project string, gen int) error {
	s.spares.mu.Lock()
	var out []spare
	keep := s.spares.ready[project][:0]
	for _, sp := range s.spares.ready[project] {
		if gen == 0 || sp.gen == gen {
			out = append(out, sp)
		} else {
			keep = append(keep, sp)
		}
	}
	s.spares.ready[project] = keep
	s.spares.mu.Unlock()
	for _, sp := range out {
		if err := s.destroy(ctx, sp.ds, true); err != nil {
			return err
		}
	}
	return nil
}

// loadSpares rebuilds the spares and claims from PARENT/spare and the claim records (see the
// rules above), and returns the volumes that are still claimed spares. The datasets in removed
// have a removal record, which wins (removal.go): they are neither claims nor spares.
func (s *Store) loadSpares(ctx context.Context, removed map[string]bool) ([]driver.Volume, error) {
	rows, err := s.listSpares(ctx)
	if err != nil {
		return nil, err
	}
	present := map[string]zfsutil.Row{}
	for _, r := range rows {
		if !removed[r["name"]] {
			present[r["name"]] = r
		}
	}
	var vols []driver.Volume
	if s.cfg.RecordDir != "" {
		recs, err := s.claimRecords()
		if err != nil {
			return nil, err
		}
		for _, rec := range recs {
			name := rec.Name
			if _, ok := present[rec.Dataset]; !ok {
				// Spent: renamed to vol/NAME, or removed (its removal record, if the dataset is
				// still there). Either way the record says nothing more.
				if err := s.deleteRecord(name); err != nil {
					return nil, err
				}
				continue
			}
			delete(present, rec.Dataset)
			// Its device, before the finisher can rename the spare: Mount uses it (deviceOf).
			dev, err := s.zfs.WaitDevice(ctx, rec.Dataset, s.cfg.DeviceTimeout)
			if err != nil {
				return nil, err
			}
			c := &claim{claimRecord: rec, dev: dev}
			s.spares.claims[name] = c
			vols = append(vols, c.volume())
			s.log.WithFields(logrus.Fields{"volume": name, "dataset": rec.Dataset}).Info("a claimed spare is renamed in the background")
		}
	}
	for ds, r := range present {
		if ds == s.spareRoot() {
			continue
		}
		project, gen, ok := s.originGeneration(r["origin"])
		if !ok {
			s.log.WithFields(logrus.Fields{"dataset": ds, "origin": r["origin"]}).Warn("destroying a spare that is no clone of a generation")
			if err := s.destroy(ctx, ds, true); err != nil {
				return nil, err
			}
			continue
		}
		s.spares.ready[project] = append(s.spares.ready[project], s.listedSpare(ctx, ds, gen))
	}
	// The worker starts only now, so it never makes a spare that this listing would count twice.
	s.spares.start.Do(func() {
		bg, cancel := context.WithCancel(context.Background())
		s.spares.stop, s.spares.done = cancel, make(chan struct{})
		go s.spareWorker(bg, s.spares.done)
	})
	s.kickSpares()
	return vols, nil
}

// sparesReady counts the ready spares per project, for Status.
func (s *Store) sparesReady() map[string]int {
	s.spares.mu.Lock()
	defer s.spares.mu.Unlock()
	out := map[string]int{}
	for p, list := range s.spares.ready {
		if len(list) > 0 {
			out[p] = len(list)
		}
	}
	return out
}

func (s *Store) claimsPending() int {
	s.spares.mu.Lock()
	defer s.spares.mu.Unlock()
	return len(s.spares.claims)
}

// awaited counts the spares being made of project ("" for every project), and how many of them
// a Create waits for.
func (s *Store) awaited(project string) (making, waited int) {
	s.spares.mu.Lock()
	defer s.spares.mu.Unlock()
	for _, m := range s.spares.making {
		if project == "" || m.project == project {
			making++
			if m.waiter != nil {
				waited++
			}
		}
	}
	return making, waited
}
