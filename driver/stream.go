package driver

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
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
	d.projects.Lock(project)
	h, write, err := t.ExportGolden(ctx, project, n, base)
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
	d.log.WithFields(logrus.Fields{"project": project, "generation": h.Generation, "base": h.Base}).Info("golden export started")
	if err := write(ctx, w); err != nil {
		return h, fmt.Errorf("export golden %q generation %d: %w", project, h.Generation, err)
	}
	d.log.WithFields(logrus.Fields{"project": project, "generation": h.Generation, "base": h.Base}).Info("golden export finished")
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
