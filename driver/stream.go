package driver

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strings"

	"github.com/sirupsen/logrus"
)

// StreamFormat names the format of a golden stream: one JSON header line (StreamHeader), then
// the backend's own bytes (on ZFS, a zfs send stream).
const StreamFormat = "zgolden-golden-stream/1"

// maxHeader bounds the header line, so a stream that is not one is refused before it is read
// whole.
const maxHeader = 64 << 10

// StreamHeader says what a golden stream carries and what the receiver must already have.
type StreamHeader struct {
	Format     string `json:"format"`
	Backend    string `json:"backend"` // "zfs" or "reflink": a stream goes only to its own kind of store
	Project    string `json:"project"`
	Kind       Kind   `json:"kind"`
	Generation int    `json:"generation"`
	// GUID identifies the generation's content (on ZFS the snapshot's guid): a receiver holding
	// generation N with another GUID has a diverged history.
	GUID string `json:"guid"`
	// Base is the generation the stream is incremental from (0 for a full stream), which the
	// receiver must hold with BaseGUID.
	Base     int    `json:"base,omitempty"`
	BaseGUID string `json:"base_guid,omitempty"`
	// Resume marks the rest of an interrupted stream, sent from the receiver's resume token: it
	// goes into the partial receive the receiver kept, never into a new generation.
	Resume bool `json:"resume,omitempty"`
}

// PartialReceive is an interrupted receive that a backend keeps so the next transfer of the
// same generation resumes it instead of starting over. It is never visible to Creates.
type PartialReceive struct {
	Project    string `json:"project"`
	Generation int    `json:"generation,omitempty"`
	// Token is what the sender needs to send the rest ("" when nothing is kept).
	Token string `json:"token,omitempty"`
}

// Resumer is implemented by a backend whose receives can resume (ZFS: zfs receive -s). Its
// Goldens report each project's partial receive.
type Resumer interface {
	// ExportResume is ExportGolden for the rest of the stream a receiver's token names. A
	// token that names a snapshot of another project, or none of this store's, is refused; one
	// whose snapshot no longer is what the token says (destroyed, or moved by a promotion)
	// fails with ErrStaleToken.
	ExportResume(ctx context.Context, project, token string) (StreamHeader, func(ctx context.Context, w io.Writer) error, error)
}

// ErrStaleToken: the resume token's stream can no longer be sent; the sender starts over.
var ErrStaleToken = errors.New("the resume token's stream can no longer be sent")

// resumeTokenRE is the form of a zfs resume token ("1-" and three hex fields): a token crosses
// hosts, goes into a remote command line and into zfs's argv, so nothing else is let through.
var resumeTokenRE = regexp.MustCompile(`^[0-9]{1,4}(-[0-9a-f]+){3}$`)

// ValidateResumeToken checks that token has the form of a resume token.
func ValidateResumeToken(token string) error {
	if len(token) > 64<<10 || !resumeTokenRE.MatchString(token) {
		return invalidf("%.40q is not a resume token (zgolden golden ls --json shows the receiver's, as Partial)", token)
	}
	return nil
}

// Transferer is implemented by a backend that can move goldens between hosts as streams.
type Transferer interface {
	// ExportGolden checks that generation n (0: the newest) of project can be sent, incremental
	// from generation base (0: full), places what keeps both from being destroyed while the
	// stream is written (on ZFS a hold), and returns the header and a function that writes the
	// stream's bytes to w and then releases the holds (with w nil, it only releases them). The driver holds the project's lock only
	// around ExportGolden, not while the bytes are written.
	ExportGolden(ctx context.Context, project string, n, base int) (StreamHeader, func(ctx context.Context, w io.Writer) error, error)
	// ReceiveGolden reads a stream's bytes (after its header h, already checked against the
	// project and backend) into a new generation that becomes visible to Creates only once it
	// is complete and checked; on any error nothing of it is left.
	ReceiveGolden(ctx context.Context, h StreamHeader, r io.Reader) (Generation, error)
}

// Export writes generation n (0: the newest) of project to w as a golden stream, incremental
// from generation base when base > 0.
func (d *Driver) Export(ctx context.Context, project string, n, base int, w io.Writer) (StreamHeader, error) {
	return d.ExportResume(ctx, project, n, base, "", w)
}

// ExportResume is Export that first tries to send only the rest of an interrupted stream, from
// the receiver's resume token (none: ""). When the token's stream can no longer be sent, or is
// not of generation n, it sends generation n afresh, and the receiver then drops its partial
// receive: a resume is an optimisation, never a reason for a transfer to fail.
func (d *Driver) ExportResume(ctx context.Context, project string, n, base int, token string, w io.Writer) (StreamHeader, error) {
	t, err := d.transferer()
	if err != nil {
		return StreamHeader{}, err
	}
	if err := ValidateProject(project); err != nil {
		return StreamHeader{}, err
	}
	if n < 0 || base < 0 || (n > 0 && base >= n) {
		return StreamHeader{}, invalidf("export generation %d since %d: generations are positive, and the base must be older", n, base)
	}
	if token != "" {
		if err := ValidateResumeToken(token); err != nil {
			return StreamHeader{}, err
		}
	}
	log := d.log.WithField("project", project)
	d.projects.Lock(project)
	var h StreamHeader
	var write func(context.Context, io.Writer) error
	resumed := false
	if r, ok := t.(Resumer); ok && token != "" {
		h, write, err = r.ExportResume(ctx, project, token)
		switch {
		case errors.Is(err, ErrStaleToken):
			log.WithError(err).Info("cannot resume the receiver's partial receive; sending afresh")
		case err == nil && n > 0 && h.Generation != n:
			log.WithFields(logrus.Fields{"partial": h.Generation, "generation": n}).Info("the receiver's partial receive is of another generation; sending afresh")
			_ = write(ctx, nil) // releases its holds
		case err != nil:
			d.projects.Unlock(project)
			return StreamHeader{}, fmt.Errorf("export golden %q: %w", project, err)
		default:
			resumed = true
		}
	}
	if !resumed {
		h, write, err = t.ExportGolden(ctx, project, n, base)
	}
	d.projects.Unlock(project)
	if err != nil {
		return StreamHeader{}, fmt.Errorf("export golden %q: %w", project, err)
	}
	h.Format, h.Backend, h.Project = StreamFormat, d.backend.Name(), project
	line, err := json.Marshal(h)
	if err != nil {
		return h, err
	}
	if _, err := w.Write(append(line, '\n')); err != nil {
		_ = write(ctx, nil) // releases the holds; the reader is gone
		return h, fmt.Errorf("export golden %q: %w", project, err)
	}
	log = log.WithFields(logrus.Fields{"generation": h.Generation, "base": h.Base, "resume": h.Resume})
	log.Info("golden export started")
	if err := write(ctx, w); err != nil {
		return h, fmt.Errorf("export golden %q generation %d: %w", project, h.Generation, err)
	}
	log.Info("golden export finished")
	return h, nil
}

// ReadStreamHeader reads and checks the header line of a golden stream, and returns it with a
// reader of the bytes after it.
func ReadStreamHeader(r io.Reader) (StreamHeader, io.Reader, error) {
	br := bufio.NewReaderSize(r, 4096)
	line, err := br.ReadSlice('\n')
	for errors.Is(err, bufio.ErrBufferFull) && len(line) < maxHeader {
		var more []byte
		more, err = br.ReadSlice('\n')
		line = append(append([]byte{}, line...), more...)
	}
	var h StreamHeader
	switch {
	case errors.Is(err, bufio.ErrBufferFull) || len(line) >= maxHeader:
		return h, nil, invalidf("not a zgolden golden stream: no header line in its first %d bytes", maxHeader)
	case errors.Is(err, io.EOF) && len(line) == 0:
		return h, nil, invalidf("the golden stream is empty")
	case err != nil && !errors.Is(err, io.EOF):
		return h, nil, fmt.Errorf("read the golden stream's header: %w", err)
	}
	dec := json.NewDecoder(strings.NewReader(string(line)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&h); err != nil || h.Format != StreamFormat {
		return h, nil, invalidf("not a zgolden golden stream (format %q): its first line must be a %s header", h.Format, StreamFormat)
	}
	if err := ValidateProject(h.Project); err != nil {
		return h, nil, invalidf("the golden stream's header names an invalid project: %v", err)
	}
	if h.Generation < 1 || h.Base < 0 || h.Base >= h.Generation || (h.Base > 0) != (h.BaseGUID != "") || h.GUID == "" ||
		(h.Kind != KindBlock && h.Kind != KindFS) {
		return h, nil, invalidf("the golden stream's header is inconsistent: %s", line)
	}
	return h, br, nil
}

// Receive reads a golden stream from r into project. The stream must be for project and for
// this kind of backend; a second transfer into the same project is refused while one runs.
func (d *Driver) Receive(ctx context.Context, project string, r io.Reader) (Generation, error) {
	t, err := d.transferer()
	if err != nil {
		return Generation{}, err
	}
	if err := ValidateProject(project); err != nil {
		return Generation{}, err
	}
	// Registered before the first byte is read: the header may be slow to come, and a second
	// transfer must be told at once, not queued behind the first.
	d.mu.Lock()
	busy := d.receiving[project]
	if !busy {
		d.receiving[project] = true
	}
	d.mu.Unlock()
	if busy {
		return Generation{}, fmt.Errorf("golden %q: %w: another transfer into it is running; wait for it to finish", project, ErrImportRunning)
	}
	defer func() {
		d.mu.Lock()
		delete(d.receiving, project)
		d.mu.Unlock()
	}()
	h, rest, err := ReadStreamHeader(r)
	if err != nil {
		return Generation{}, err
	}
	if h.Project != project {
		return Generation{}, invalidf("the stream carries golden %q, not %q; receive it as %q, or export %q", h.Project, project, h.Project, project)
	}
	if h.Backend != d.backend.Name() {
		return Generation{}, invalidf("the stream comes from a %s store and this host runs the %s store: goldens move only between stores of one kind (import the tree instead)", h.Backend, d.backend.Name())
	}
	// The project lock is held while the bytes arrive: promotions, imports and reclaims of the
	// project wait (see the lock rules); Creates do not, and see the new generation only once
	// the backend has checked it.
	d.projects.Lock(project)
	defer d.projects.Unlock(project)
	if err := d.checkReserve(ctx, "receiving golden "+project); err != nil {
		return Generation{}, err
	}
	log := d.log.WithFields(logrus.Fields{"project": project, "generation": h.Generation, "base": h.Base})
	log.Info("golden receive started")
	gen, err := t.ReceiveGolden(ctx, h, rest)
	if err != nil {
		return Generation{}, fmt.Errorf("receive golden %q generation %d: %w", project, h.Generation, err)
	}
	log.Info("golden receive finished")
	return gen, nil
}

func (d *Driver) transferer() (Transferer, error) {
	t, ok := d.backend.(Transferer)
	if !ok {
		return nil, invalidf("the %s store cannot export or receive goldens yet", d.backend.Name())
	}
	return t, nil
}
