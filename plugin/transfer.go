package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"time"

	"github.com/zgolden/zgolden/driver"
)

// trailerError is the HTTP trailer an export sets when the stream failed after its first byte,
// when the status line has long been sent: the CLI then fails instead of leaving a short stream
// that looks whole.
const trailerError = "Zgolden-Error"

// exportGolden answers GET /v1/goldens/{project}/export?generation=N&since=M[&resume=TOKEN]
// with the stream: the rest of the receiver's partial receive when TOKEN still resumes it.
func (a *admin) exportGolden(w http.ResponseWriter, r *http.Request) {
	project := r.PathValue("project")
	n, err1 := optInt(r, "generation")
	since, err2 := optInt(r, "since")
	if err := errors.Join(err1, err2); err != nil {
		a.reply(w, nil, err)
		return
	}
	w.Header().Set("Trailer", trailerError)
	sw := &startedWriter{w: w}
	start := time.Now()
	// The stream stops (and the holds are released) if the client disconnects.
	_, err := a.d.ExportResume(r.Context(), project, n, since, r.URL.Query().Get("resume"), sw)
	a.m.observe("export", start, err)
	if err != nil {
		a.log.WithError(err).WithField("project", project).Warn("export failed")
		if !sw.started {
			a.reply(w, nil, err)
			return
		}
		w.Header().Set(trailerError, err.Error())
	}
}

// receiveGolden answers POST /v1/goldens/{project}/receive, whose body is the stream.
func (a *admin) receiveGolden(w http.ResponseWriter, r *http.Request) {
	project := r.PathValue("project")
	start := time.Now()
	gen, err := a.d.Receive(r.Context(), project, r.Body)
	a.m.observe("receive", start, err)
	if err != nil {
		a.log.WithError(err).WithField("project", project).Warn("receive failed")
	}
	a.reply(w, gen, err)
}

// exportPath is the admin API's export of project's generation n since base, resuming token.
func exportPath(project string, n, base int, token string) string {
	q := url.Values{"generation": {strconv.Itoa(n)}, "since": {strconv.Itoa(base)}}
	if token != "" {
		q.Set("resume", token)
	}
	return "/v1/goldens/" + project + "/export?" + q.Encode()
}

func optInt(r *http.Request, key string) (int, error) {
	s := r.URL.Query().Get(key)
	if s == "" {
		return 0, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("%w: %s=%q must be a generation number", driver.ErrInvalid, key, s)
	}
	return n, nil
}

// startedWriter records whether anything was written, and so whether an error can still be an
// HTTP status.
type startedWriter struct {
	w       http.ResponseWriter
	started bool
}

func (s *startedWriter) Write(p []byte) (int, error) {
	if len(p) > 0 && !s.started {
		s.started = true
		s.w.Header().Set("Content-Type", "application/octet-stream")
	}
	return s.w.Write(p)
}

func cmdGoldenExport(args []string) error {
	c := newCLI("golden export")
	gen := c.fs.Int("generation", 0, "the generation to export (default: the newest)")
	since := c.fs.Int("since", 0, "send only what changed since this generation, which the receiver has (default: everything)")
	resume := c.fs.String("resume", "", "send the rest of the receiver's partial receive, from its token (zgolden golden ls --json on the receiver, Partial.token); falls back to the whole stream when it no longer resumes")
	if err := c.parse(args, 1); err != nil {
		return err
	}
	if isTerminal(os.Stdout) {
		return errors.New("golden export: the stream is binary; redirect it to a file or a pipe (zgolden golden export PRJ > FILE)")
	}
	resp, err := c.do("GET", exportPath(c.args[0], *gen, *since, *resume), nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		return decodeReply(resp, nil)
	}
	n, err := io.Copy(os.Stdout, resp.Body)
	if err != nil {
		return fmt.Errorf("golden export: the stream broke after %d bytes: %w", n, err)
	}
	if msg := resp.Trailer.Get(trailerError); msg != "" {
		return fmt.Errorf("golden export: the stream is incomplete (%d bytes written): %s", n, msg)
	}
	if c.json { // on standard error: standard output is the stream
		return json.NewEncoder(os.Stderr).Encode(map[string]any{"project": c.args[0], "bytes": n})
	}
	fmt.Fprintf(os.Stderr, "exported golden %s: %s\n", c.args[0], humanBytes(uint64(n)))
	return nil
}

func cmdGoldenReceive(args []string) error {
	c := newCLI("golden receive")
	if err := c.parse(args, 1); err != nil {
		return err
	}
	if isTerminal(os.Stdin) {
		return errors.New("golden receive: reads a stream from standard input (zgolden golden receive PRJ < FILE)")
	}
	req, err := http.NewRequestWithContext(context.Background(), "POST", "http://zgolden/v1/goldens/"+c.args[0]+"/receive", os.Stdin)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err := c.client().Do(req)
	if err != nil {
		return fmt.Errorf("cannot reach zgolden serve at %s (is it running, and are you root?): %w", c.socket, err)
	}
	defer resp.Body.Close()
	var g driver.Generation
	if err := decodeReply(resp, &g); err != nil {
		return err
	}
	if c.json {
		return printJSON(g)
	}
	fmt.Printf("received generation %d of golden %s\n", g.Number, g.Project)
	return nil
}
