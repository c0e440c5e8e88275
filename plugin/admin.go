package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/zgolden/zgolden/driver"
)

// The admin API lives in the serving process so that all locking (per volume, per project)
// happens in one place; the command line is a thin client. It listens on a root-only socket.

type promoteRequest struct {
	Volume  string `json:"volume"`
	Project string `json:"project"`
}

type promoteResponse struct {
	Generation driver.Generation   `json:"generation"`
	Reclaimed  []driver.Generation `json:"reclaimed,omitempty"`
}

type importRequest struct {
	Project      string `json:"project"`
	Dir          string `json:"dir"`
	Type         string `json:"type"`
	RemoveSource bool   `json:"remove_source"`
}

// importEvent is one line of the NDJSON stream an import answers with.
type importEvent struct {
	Progress   *driver.Progress   `json:"progress,omitempty"`
	Generation *driver.Generation `json:"generation,omitempty"`
	Error      string             `json:"error,omitempty"`
}

type reclaimRequest struct {
	Project string `json:"project"`
	Keep    int    `json:"keep"`
}

type errorResponse struct {
	Error string `json:"error"`
}

func newAdmin(d *driver.Driver, c serveConfig, log *logrus.Entry, m *metrics, reap *reaper, labels *labeler) http.Handler {
	mux := http.NewServeMux()
	a := &admin{d: d, keep: c.KeepGenerations, log: log.WithField("api", "admin"), m: m, reap: reap, mountRoot: c.MountRoot, labels: labels}
	// Verbs that can change which goldens the host holds ask for a label pass when they end.
	changes := func(h http.HandlerFunc) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) { h(w, r); a.labels.kick() }
	}
	mux.HandleFunc("POST /v1/reap", a.reapNow)
	mux.HandleFunc("GET /v1/doctor", a.doctor)
	mux.HandleFunc("GET /v1/status", a.status)
	mux.HandleFunc("GET /v1/goldens", a.goldens)
	mux.HandleFunc("POST /v1/promote", changes(a.promote))
	mux.HandleFunc("POST /v1/import", changes(a.importGolden))
	mux.HandleFunc("POST /v1/reclaim", changes(a.reclaim))
	mux.HandleFunc("DELETE /v1/goldens/{project}", changes(a.removeGolden)) // ?force=true also removes dependent volumes
	mux.HandleFunc("GET /v1/goldens/{project}/export", a.exportGolden)      // ?generation=N&since=M; the body is the stream
	mux.HandleFunc("POST /v1/goldens/{project}/receive", changes(a.receiveGolden))
	return mux
}

type admin struct {
	d    *driver.Driver
	keep int
	log  *logrus.Entry
	m    *metrics // nil without --metrics-listen
	reap *reaper
	// mountRoot is where volumes are mounted, for doctor's propagation check.
	mountRoot string
	labels    *labeler // nil without --swarm-labels
}

func (a *admin) doctor(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Minute)
	defer cancel()
	out := append(a.d.Doctor(ctx), propagationFinding(a.mountRoot), bootOrderFinding(a.d.Backend()))
	if a.labels != nil {
		out = append(out, a.labels.finding())
	}
	a.reply(w, out, nil)
}

type reapRequest struct {
	After  string `json:"after"` // a duration; "" for the server's --reap-unused-after
	DryRun bool   `json:"dry_run"`
}

// reapNow runs one reap pass (or lists what it would reap) for `zgolden volume reap`.
func (a *admin) reapNow(w http.ResponseWriter, r *http.Request) {
	var req reapRequest
	if err := decode(r, &req); err != nil {
		a.reply(w, nil, err)
		return
	}
	after := a.reap.after
	if req.After != "" {
		d, err := time.ParseDuration(req.After)
		if err != nil || d <= 0 {
			a.reply(w, nil, errors.Join(driver.ErrInvalid, fmt.Errorf("after %q: want a positive duration such as 24h", req.After)))
			return
		}
		after = d
	}
	if after <= 0 {
		a.reply(w, nil, errors.Join(driver.ErrInvalid, errors.New("no idle time given: pass --after DURATION, or run the server with --reap-unused-after")))
		return
	}
	start := time.Now()
	out, err := a.reap.pass(r.Context(), after, req.DryRun)
	if !req.DryRun {
		a.m.observe("reap", start, err)
	}
	if out == nil {
		out = []reapDecision{}
	}
	a.reply(w, out, err)
}

func (a *admin) reply(w http.ResponseWriter, v any, err error) {
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		w.WriteHeader(httpStatus(err))
		v = errorResponse{Error: err.Error()}
	}
	_ = json.NewEncoder(w).Encode(v)
}

func httpStatus(err error) int {
	switch {
	case errors.Is(err, driver.ErrInvalid):
		return http.StatusBadRequest
	case errors.Is(err, driver.ErrNotFound):
		return http.StatusNotFound
	case errors.Is(err, driver.ErrBusy), errors.Is(err, driver.ErrHasDependents), errors.Is(err, driver.ErrImportRunning),
		errors.Is(err, driver.ErrExists), errors.Is(err, driver.ErrGenerationInUse):
		return http.StatusConflict
	case errors.Is(err, driver.ErrNoSpace):
		return http.StatusInsufficientStorage
	default:
		return http.StatusInternalServerError
	}
}

func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return errors.Join(driver.ErrInvalid, err)
	}
	return nil
}

func (a *admin) status(w http.ResponseWriter, r *http.Request) {
	st, err := a.d.Status(r.Context())
	a.reply(w, st, err)
}

func (a *admin) goldens(w http.ResponseWriter, r *http.Request) {
	gs, err := a.d.Goldens(r.Context())
	a.reply(w, gs, err)
}

func (a *admin) promote(w http.ResponseWriter, r *http.Request) {
	var req promoteRequest
	if err := decode(r, &req); err != nil {
		a.reply(w, nil, err)
		return
	}
	// Promotion must finish or roll back even if the client goes away.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), time.Hour)
	defer cancel()
	start := time.Now()
	gen, reclaimed, err := a.d.PromoteAndReclaim(ctx, req.Volume, req.Project, a.keep)
	a.m.observe("promote", start, err)
	if err != nil {
		a.log.WithError(err).WithFields(logrus.Fields{"volume": req.Volume, "project": req.Project}).Warn("promote failed")
		a.reply(w, nil, err)
		return
	}
	a.reply(w, promoteResponse{Generation: gen, Reclaimed: reclaimed}, nil)
}

func (a *admin) importGolden(w http.ResponseWriter, r *http.Request) {
	var req importRequest
	if err := decode(r, &req); err != nil {
		a.reply(w, nil, err)
		return
	}
	kind := driver.Kind(req.Type) // the driver checks it
	w.Header().Set("Content-Type", "application/x-ndjson")
	enc := json.NewEncoder(w)
	flusher, _ := w.(http.Flusher)
	send := func(ev importEvent) {
		_ = enc.Encode(ev)
		if flusher != nil {
			flusher.Flush()
		}
	}
	var last time.Time
	start := time.Now()
	// The import stops (and rolls back) if the client disconnects: an operator's Ctrl-C means stop.
	gen, err := a.d.Import(r.Context(), req.Project, kind, req.Dir, driver.ImportOptions{RemoveSource: req.RemoveSource}, func(p driver.Progress) {
		if time.Since(last) >= 500*time.Millisecond || p.Phase == "done" {
			last = time.Now()
			send(importEvent{Progress: &p})
		}
	})
	a.m.observe("import", start, err)
	if err != nil {
		a.log.WithError(err).WithFields(logrus.Fields{"project": req.Project, "dir": req.Dir}).Warn("import failed")
		send(importEvent{Error: err.Error()})
		return
	}
	send(importEvent{Generation: &gen})
}

func (a *admin) reclaim(w http.ResponseWriter, r *http.Request) {
	var req reclaimRequest
	if err := decode(r, &req); err != nil {
		a.reply(w, nil, err)
		return
	}
	start := time.Now()
	removed, err := a.d.Reclaim(r.Context(), req.Project, req.Keep)
	a.m.observe("reclaim", start, err)
	if removed == nil {
		removed = []driver.Generation{}
	}
	a.reply(w, removed, err)
}

func (a *admin) removeGolden(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	err := a.d.RemoveGolden(r.Context(), r.PathValue("project"), r.URL.Query().Get("force") == "true")
	a.m.observe("golden_remove", start, err)
	a.reply(w, map[string]string{"removed": r.PathValue("project")}, err)
}
