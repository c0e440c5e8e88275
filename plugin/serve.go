package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/docker/go-plugins-helpers/volume"
	"github.com/sirupsen/logrus"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/internal/fault"
	"github.com/zgolden/zgolden/internal/retry"
	"github.com/zgolden/zgolden/reflinkstore"
	"github.com/zgolden/zgolden/zfsstore"
	"github.com/zgolden/zgolden/zfsutil"
)

func newLogger(c serveConfig) (*logrus.Logger, error) {
	l := logrus.New()
	l.SetOutput(os.Stderr)
	lvl, err := logrus.ParseLevel(c.LogLevel)
	if err != nil {
		return nil, fmt.Errorf("--log-level %q: use debug, info, warn or error", c.LogLevel)
	}
	l.SetLevel(lvl)
	// Milliseconds: a slow call's steps (a record's fsync, a bind, a zfs command) are told apart
	// by their times, and whole seconds hide them.
	const stamp = "2006-01-02T15:04:05.000Z07:00"
	switch c.LogFormat {
	case "json":
		l.SetFormatter(&logrus.JSONFormatter{TimestampFormat: stamp})
	case "text":
		l.SetFormatter(&logrus.TextFormatter{FullTimestamp: true, TimestampFormat: stamp})
	default:
		return nil, fmt.Errorf("--log-format %q: use text or json", c.LogFormat)
	}
	return l, nil
}

// openBackend chooses and opens the backend, saying which and why.
func openBackend(ctx context.Context, c serveConfig, faults *fault.Injector, log *logrus.Entry) (driver.Backend, error) {
	useZFS := c.Backend == "zfs"
	// A refused zfs userland and module pair stops the start even in auto: falling back to the
	// reflink store would hide it, and a managed plugin must refuse at enable time. This runs
	// before any other zfs command (DefaultParent, Check), since a refused pair misreports.
	var versions *zfsstore.ZFSVersions // read once: the store takes them as they were
	if c.Backend != "reflink" && zfsstore.Present() {
		v, err := zfsstore.Versions(ctx, zfsutil.New(log), c.ZFSProven)
		if errors.Is(err, zfsutil.ErrPair) {
			return nil, err
		}
		if err == nil {
			versions = &v
		}
	}
	if c.Parent == "" && c.Backend != "reflink" {
		if c.Parent = zfsstore.DefaultParent(ctx); c.Parent != "" {
			log.WithField("parent", c.Parent).Info("no --parent given: using the only imported pool")
		}
	}
	if c.Backend == "zfs" || c.Backend == "auto" && c.Parent != "" {
		err := waitForZFS(ctx, c, log)
		switch {
		case err == nil:
			useZFS = true
		case c.Backend == "zfs":
			return nil, fmt.Errorf("--backend zfs: %w", err)
		default:
			log.WithError(err).Warn("backend auto: ZFS is not usable, falling back to the reflink store")
		}
	}
	if useZFS {
		log.WithFields(logrus.Fields{"backend": "zfs", "parent": c.Parent}).Info("backend chosen: ZFS zvol clones (the zfs tools, /dev/zfs and the pool are present)")
		return zfsstore.New(ctx, zfsstore.Config{
			Parent: c.Parent, Volblocksize: c.Volblocksize, Compression: c.Compression,
			Discard: c.Discard, DefaultSize: c.DefaultSize, Adopt: c.Adopt,
			Spares: c.Spares, RecordDir: c.RecordDir, ProvenZFS: c.ZFSProven, Versions: versions,
			WorkDir: filepath.Join(c.StateDir, "work"), Faults: faults, Log: log,
		})
	}
	reason := "no --parent dataset is configured"
	if c.Backend == "reflink" {
		reason = "--backend reflink"
	} else if c.Parent != "" {
		reason = "ZFS is not usable (see the warning above)"
	}
	log.WithFields(logrus.Fields{"backend": "reflink", "root": c.Root, "reason": reason}).Info("backend chosen: reflink image store")
	return reflinkstore.New(ctx, reflinkstore.Config{
		Root: c.Root, StoreSize: c.StoreSize, Discard: c.Discard, DefaultSize: c.DefaultSize,
		WorkDir: filepath.Join(c.StateDir, "work"), Adopt: c.Adopt, Spares: c.Spares, Faults: faults, Log: log,
		Reserved: []string{c.MountRoot, c.StateDir, c.RecordDir},
	})
}

// waitForZFS checks ZFS's prerequisites, retrying for --wait-pool: at boot the plugin can start
// before the pool is imported (docs/design-facts.md, "Boot order").
func waitForZFS(ctx context.Context, c serveConfig, log *logrus.Entry) error {
	var last error
	err := retry.PoolImport.WithinTime(c.WaitPool).Poll(ctx, func() (bool, error) {
		if last = zfsstore.Check(ctx, c.Parent); last != nil && c.WaitPool > 0 {
			log.WithError(last).Info("waiting for ZFS (--wait-pool)")
		}
		return last == nil, nil
	})
	if errors.Is(err, retry.ErrGaveUp) {
		return last
	}
	return err
}

func serve(args []string) error {
	c, err := parseServe(args)
	if err != nil {
		return err
	}
	logger, err := newLogger(c)
	if err != nil {
		return err
	}
	log := logrus.NewEntry(logger)
	if os.Geteuid() != 0 {
		return errors.New("zgolden serve must run as root: it creates block devices and mounts filesystems")
	}
	setNice(c.Nice, log)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	// Fault injection is for crash tests only: an environment variable, never a flag.
	faults := fault.FromEnv()
	if !faults.Valid() {
		return fmt.Errorf("$%s=%q or $%s=%q names no fault point; known points: %v, pause points (POINT=DURATION): %v",
			fault.EnvVar, faults.Point(), fault.PauseEnvVar, os.Getenv(fault.PauseEnvVar), fault.Points, fault.Pauses)
	}
	if faults != nil {
		log.WithFields(logrus.Fields{"point": faults.Point(), "pause": os.Getenv(fault.PauseEnvVar)}).Warn("fault injection is on: the plugin will SIGKILL itself at this point, or pause at that one")
	}
	backend, err := openBackend(ctx, c, faults, log)
	if err != nil {
		return err
	}
	// The Docker API, for busy errors that name containers and for reaping. Nothing connects
	// here: a host without a reachable engine (the managed plugin) just gets neither.
	eng, err := newEngine()
	if err != nil {
		return err
	}
	d, err := driver.New(ctx, driver.Config{
		Backend: backend, MountRoot: c.MountRoot, StateDir: c.StateDir, Holders: eng.holders, Active: eng.active,
		DefaultSize: c.DefaultSize, ImportWait: c.ImportWait, Reserve: c.Reserve, Log: log,
		LegacyGoldens: c.LegacyGoldens, LegacyRemove: c.LegacyRemove, Faults: faults,
	})
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(c.Socket), 0o755); err != nil {
		return err
	}
	pl, err := listenUnix(c.Socket)
	if err != nil {
		return fmt.Errorf("plugin socket: %w", err)
	}
	al, err := listenUnix(c.AdminSocket)
	if err != nil {
		pl.Close()
		return fmt.Errorf("admin socket: %w", err)
	}
	var m *metrics
	var ml net.Listener
	if c.MetricsListen != "" {
		if ml, err = metricsListener(c.MetricsListen); err != nil {
			pl.Close()
			al.Close()
			return fmt.Errorf("--metrics-listen %s: %w", c.MetricsListen, err)
		}
		m = newMetrics(d, backend.Name())
	}
	reap := newReaper(d, eng, c.ReapUnusedAfter, log)
	if c.ReapUnusedAfter > 0 {
		go reap.run(ctx)
		log.WithField("after", c.ReapUnusedAfter.String()).Info("reaping volumes no container has referenced")
	}
	var labels *labeler
	if c.SwarmLabels != "" {
		if labels, err = newLabeler(d, eng.c, c.SwarmLabels, c.SwarmManager, backend.Name(), strings.TrimSuffix(filepath.Base(c.Socket), ".sock"), log); err != nil {
			pl.Close()
			al.Close()
			return err
		}
		go labels.run(ctx)
	}
	api := &volumeAPI{d: d, log: log, m: m, reap: reap}
	// go-plugins-helpers owns the Docker side's HTTP server; closing its listener stops it.
	plugin := volume.NewHandler(api)
	admin := &http.Server{Handler: newAdmin(d, c, log, m, reap, labels), ReadHeaderTimeout: 10 * time.Second}
	metricsSrv := &http.Server{ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 3)
	go func() { errc <- plugin.Serve(pl) }()
	go func() { errc <- admin.Serve(al) }()
	if ml != nil {
		metricsSrv.Handler = metricsHandler(m, d)
		go func() { errc <- metricsSrv.Serve(ml) }()
		log.WithField("metrics", c.MetricsListen).Info("serving Prometheus metrics at /metrics")
	}
	log.WithFields(logrus.Fields{"socket": c.Socket, "admin": c.AdminSocket, "backend": backend.Name()}).Info("zgolden serving")

	select {
	case <-ctx.Done():
		log.Info("shutting down; mounted volumes stay mounted for their containers")
	case err = <-errc:
	}
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	pl.Close()
	_ = admin.Shutdown(sctx)
	_ = metricsSrv.Shutdown(sctx)
	if r, ok := backend.(*reflinkstore.Store); ok {
		// Stops the spare worker and unmounts the kept mounts; mounted volumes stay mounted for
		// their containers, and the store file stays mounted.
		if err := r.Stop(sctx); err != nil {
			log.WithError(err).Warn("could not unmount every kept mount at the stop; the next start keeps or unmounts them")
		}
	}
	if z, ok := backend.(*zfsstore.Store); ok {
		// Stops the trash worker and closes the devices Unmount kept open; mounted volumes
		// stay mounted for their containers.
		if err := z.Close(sctx); err != nil {
			log.WithError(err).Warn("the ZFS trash worker did not stop in time; removed volumes left are destroyed at the next start")
		}
	}
	os.Remove(c.Socket)
	os.Remove(c.AdminSocket)
	if path, ok := strings.CutPrefix(c.MetricsListen, "unix:"); ok {
		os.Remove(path)
	}
	if errors.Is(err, http.ErrServerClosed) || errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// listenUnix listens on a root-only (0600) socket: whoever can talk to it can destroy volumes.
func listenUnix(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	old := syscall.Umask(0o177) // the socket is created 0600, with no window where it is wider
	l, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, err
	}
	return l, os.Chmod(path, 0o600)
}
