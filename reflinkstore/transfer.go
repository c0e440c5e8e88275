package reflinkstore

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/xfsutil"
)

// A generation moves between reflink stores whole: its image, sent sparse-aware (only the
// extents that hold data) in the format of sendImage. There is no incremental form: an image
// shares its extents with its volumes only inside one filesystem. The rules otherwise follow the
// ZFS store's (docs/fleet.md): the generation is identified by a random guid given when it is
// made (or first exported), a diverged receiver is refused, and the received image becomes a
// generation only once it is whole, its digest matches and its XFS mounts read-only here.

var _ driver.Transferer = (*Store)(nil)

// imageMagic starts the body of a reflink golden stream.
const imageMagic = "ZGIMG1\n"

// The bounds a received stream must keep, so a hostile one cannot make the store allocate or
// loop without end: a record holds at most maxRecord bytes, and an image is at most maxImage.
const (
	maxRecord = 4 << 20
	maxImage  = 64 << 40
)

// ExportGolden implements driver.Transferer. The open image stands in for the ZFS store's hold:
// a reclaim racing the export may unlink the generation, and its data stays readable until the
// stream ends.
func (s *Store) ExportGolden(ctx context.Context, projectName string, n, base int) (driver.StreamHeader, func(context.Context, io.Writer) error, error) {
	if err := driver.ValidateProject(projectName); err != nil {
		return driver.StreamHeader{}, nil, err
	}
	if base > 0 {
		return driver.StreamHeader{}, nil, fmt.Errorf("%w: the reflink store sends whole generations; export without --since", driver.ErrInvalid)
	}
	p, err := s.readProject(projectName, false)
	if err != nil {
		return driver.StreamHeader{}, nil, err
	}
	if p == nil || len(p.gens) == 0 {
		return driver.StreamHeader{}, nil, driver.GoldenMissingError(projectName)
	}
	gen := p.gens[len(p.gens)-1]
	if n > 0 {
		g := findGen(p.gens, n)
		if g == nil {
			return driver.StreamHeader{}, nil, driver.GenerationMissingError(projectName, n)
		}
		gen = *g
	}
	guid, err := s.generationGUID(gen.Source)
	if err != nil {
		return driver.StreamHeader{}, nil, err
	}
	f, err := os.Open(gen.Source)
	if err != nil {
		return driver.StreamHeader{}, nil, mapErr(err)
	}
	h := driver.StreamHeader{Kind: p.kind, Generation: gen.Number, GUID: guid}
	write := func(ctx context.Context, w io.Writer) error {
		defer f.Close()
		if w == nil {
			return nil
		}
		s.cfg.Faults.Hit("export:after-hold")
		return sendImage(ctx, s.cfg.Faults.Writer("export:mid-stream", w), f)
	}
	return h, write, nil
}

func findGen(gens []driver.Generation, n int) *driver.Generation {
	for i := range gens {
		if gens[i].Number == n {
			return &gens[i]
		}
	}
	return nil
}

// generationGUID returns the generation image's guid, giving it one if it has none yet (images
// made before generations had guids).
func (s *Store) generationGUID(img string) (string, error) {
	m, err := readMeta(img)
	if err != nil {
		return "", err
	}
	if g := m[attrGUID]; g != "" {
		return g, nil
	}
	g := newGUID()
	if err := setAttr(img, attrGUID, g); err != nil {
		return "", err
	}
	return g, nil
}

func newGUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// ReceiveGolden implements driver.Transferer.
func (s *Store) ReceiveGolden(ctx context.Context, h driver.StreamHeader, r io.Reader) (driver.Generation, error) {
	defer s.kickSpares() // the project may have a new newest generation (spares.go)
	if err := driver.ValidateProject(h.Project); err != nil {
		return driver.Generation{}, err
	}
	if h.Base > 0 || h.Resume {
		return driver.Generation{}, fmt.Errorf("%w: the stream is incremental or resumes another, and the reflink store receives whole generations only", driver.ErrInvalid)
	}
	p, err := s.readProject(h.Project, false)
	if err != nil {
		return driver.Generation{}, err
	}
	if p != nil {
		if p.kind != h.Kind {
			return driver.Generation{}, driver.KindMismatchError(h.Project, p.kind, h.Kind)
		}
		if g := findGen(p.gens, h.Generation); g != nil {
			guid, err := s.generationGUID(g.Source)
			if err != nil {
				return driver.Generation{}, err
			}
			if guid != h.GUID {
				return driver.Generation{}, fmt.Errorf("%w: generation %d of %q here (guid %s) is not the sender's (guid %s): the two hosts' histories diverged; remove the golden here, or receive into another project", driver.ErrGenerationInUse, h.Generation, h.Project, guid, h.GUID)
			}
			return *g, nil // already here
		}
		if m := p.maxGeneration(); m >= h.Generation {
			return driver.Generation{}, fmt.Errorf("%w: golden %q here has already given out generation %d, at or past the stream's %d, which it lacks: its history diverged from the sender's; remove the golden here, or receive into another project", driver.ErrGenerationInUse, h.Project, m, h.Generation)
		}
	}
	p, created, err := s.ensureProject(h.Project, h.Kind)
	if err != nil {
		return driver.Generation{}, err
	}
	n := h.Generation
	tmp, err := newTemp(p.dir, genPrefix+strconv.Itoa(n))
	if err != nil {
		if created {
			s.removeProjectDir(p.dir)
		}
		return driver.Generation{}, mapErr(err)
	}
	log := s.log.WithFields(logrus.Fields{"project": p.name, "image": tmp.Name(), "generation": n})
	fail := func(err error) (driver.Generation, error) {
		s.discard(log, tmp)
		if created {
			s.removeProjectDir(p.dir)
		}
		return driver.Generation{}, err
	}
	// Not ready until checked: a crash before the marker leaves a temporary image Load deletes.
	err = setAttrs(tmp, meta{attrKind: string(h.Kind), attrState: "receiving", attrFrom: "receive",
		attrCreated: strconv.FormatInt(time.Now().Unix(), 10), attrGUID: h.GUID})
	if err != nil {
		return fail(mapErr(err))
	}
	if err := receiveImage(ctx, s.cfg.Faults.Reader("receive:mid-stream", r), tmp); err != nil {
		return fail(err)
	}
	if err := tmp.Sync(); err != nil {
		return fail(mapErr(err))
	}
	if err := s.checkMounts(ctx, tmp.Name(), filepath.Join(s.cfg.WorkDir, "receive-"+p.name+"-"+strconv.Itoa(n))); err != nil {
		return fail(err)
	}
	s.cfg.Faults.Hit("receive:after-stream")
	if err := setAttr(p.dir, attrLastGen, strconv.Itoa(max(n, p.lastGen))); err != nil {
		return fail(err)
	}
	// The completion marker: from here a crash rolls forward (see cleanTemps).
	if err := setAttrs(tmp, meta{attrState: stateReady}); err != nil {
		return fail(mapErr(err))
	}
	s.cfg.Faults.Hit("receive:after-ready")
	if err := commit(tmp, genImage(p.dir, n)); err != nil {
		return fail(mapErr(err))
	}
	tmp.Close()
	log.Info("golden generation received")
	return s.generation(p.name, n)
}

// checkMounts loop-mounts the received image's XFS read-only at dir and unmounts it: an image
// this host's kernel cannot mount (features of a newer mkfs.xfs) never becomes a generation.
func (s *Store) checkMounts(ctx context.Context, img, dir string) error {
	if err := xfsutil.Mount(ctx, img, dir, []string{"loop", "ro", "norecovery", "nouuid"}); err != nil {
		_ = os.Remove(dir)
		return fmt.Errorf("%w: the received generation's XFS does not mount on this host's kernel: %v (was it made by a zgolden with another feature set?)", driver.ErrInvalid, err)
	}
	uctx, cancel := bounded(ctx, time.Minute)
	defer cancel()
	if err := xfsutil.UnmountRetry(uctx, dir, 10); err != nil {
		return mapErr(err)
	}
	_ = os.Remove(dir)
	return s.releaseLoops(img)
}

// sendImage writes f as imageMagic, its size, one record (offset, length, data) per run of data
// (SEEK_DATA / SEEK_HOLE: holes are not sent), an end record, and the SHA-256 of every record.
func sendImage(ctx context.Context, w io.Writer, f *os.File) error {
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	bw := bufio.NewWriterSize(w, 1<<20)
	sum := sha256.New()
	out := io.MultiWriter(bw, sum)
	if _, err := bw.WriteString(imageMagic); err != nil {
		return err
	}
	if err := binary.Write(bw, binary.BigEndian, uint64(fi.Size())); err != nil {
		return err
	}
	buf := make([]byte, maxRecord)
	for off := int64(0); off < fi.Size(); {
		data, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole is left
		}
		if err != nil {
			return fmt.Errorf("find data in %s: %w", f.Name(), err)
		}
		hole, err := unix.Seek(int(f.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("find a hole in %s: %w", f.Name(), err)
		}
		for data < hole {
			if err := ctx.Err(); err != nil {
				return err
			}
			n, err := f.ReadAt(buf[:min(int64(len(buf)), hole-data)], data)
			if n == 0 && err != nil {
				return fmt.Errorf("read %s: %w", f.Name(), err)
			}
			if err := writeRecord(out, uint64(data), buf[:n]); err != nil {
				return err
			}
			data += int64(n)
		}
		off = hole
	}
	if err := writeRecord(out, math.MaxUint64, nil); err != nil {
		return err
	}
	if _, err := bw.Write(sum.Sum(nil)); err != nil {
		return err
	}
	return bw.Flush()
}

func writeRecord(w io.Writer, off uint64, data []byte) error {
	var head [12]byte
	binary.BigEndian.PutUint64(head[:8], off)
	binary.BigEndian.PutUint32(head[8:], uint32(len(data)))
	if _, err := w.Write(head[:]); err != nil {
		return err
	}
	_, err := w.Write(data)
	return err
}

// receiveImage reads what sendImage wrote into f (empty), sparse: only the records' extents are
// written. Every bound is checked before it is used, and the digest at the end decides.
func receiveImage(ctx context.Context, r io.Reader, f *os.File) error {
	br := bufio.NewReaderSize(r, 1<<20)
	truncated := func(err error) error {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return fmt.Errorf("%w: the stream is truncated, and nothing of it was kept", driver.ErrInvalid)
		}
		return fmt.Errorf("read the golden stream: %w", err)
	}
	magic := make([]byte, len(imageMagic))
	if _, err := io.ReadFull(br, magic); err != nil {
		return truncated(err)
	}
	if string(magic) != imageMagic {
		return fmt.Errorf("%w: the stream's body is not a reflink golden image (a stream of another kind of store?)", driver.ErrInvalid)
	}
	var size uint64
	if err := binary.Read(br, binary.BigEndian, &size); err != nil {
		return truncated(err)
	}
	if size == 0 || size > maxImage {
		return fmt.Errorf("%w: the stream's image size %d is out of range", driver.ErrInvalid, size)
	}
	if err := f.Truncate(int64(size)); err != nil {
		return mapErr(err)
	}
	sum := sha256.New()
	buf := make([]byte, maxRecord)
	var next uint64 // records come in order and never overlap
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		var head [12]byte
		if _, err := io.ReadFull(br, head[:]); err != nil {
			return truncated(err)
		}
		sum.Write(head[:])
		off, n := binary.BigEndian.Uint64(head[:8]), uint64(binary.BigEndian.Uint32(head[8:]))
		if off == math.MaxUint64 && n == 0 {
			break
		}
		if n == 0 || n > maxRecord || off < next || off > size || n > size-off {
			return fmt.Errorf("%w: the stream is corrupt (a record of %d bytes at %d in an image of %d), and nothing of it was kept", driver.ErrInvalid, n, off, size)
		}
		if _, err := io.ReadFull(br, buf[:n]); err != nil {
			return truncated(err)
		}
		sum.Write(buf[:n])
		if _, err := f.WriteAt(buf[:n], int64(off)); err != nil {
			if err = mapErr(err); errors.Is(err, driver.ErrNoSpace) {
				return fmt.Errorf("nothing of the stream was kept: %w", err) // err says what to free

			}
			return err
		}
		next = off + n
	}
	want := make([]byte, sha256.Size)
	if _, err := io.ReadFull(br, want); err != nil {
		return truncated(err)
	}
	if string(want) != string(sum.Sum(nil)) {
		return fmt.Errorf("%w: the stream is corrupt (its digest does not match), and nothing of it was kept", driver.ErrInvalid)
	}
	return nil
}
