package main

import (
	"context"
	"fmt"
	"time"

	"github.com/docker/go-plugins-helpers/volume"
	"github.com/sirupsen/logrus"

	"github.com/zgolden/zgolden/driver"
)

// volumeAPI adapts the driver to go-plugins-helpers' volume.Driver. Every method is written out,
// not embedded, so a missing one is a compile error rather than a nil-pointer panic at run time.
type volumeAPI struct {
	d    *driver.Driver
	log  *logrus.Entry
	m    *metrics // nil without --metrics-listen
	reap *reaper  // told of every mount and unmount
}

var _ volume.Driver = (*volumeAPI)(nil)

// Docker gives Create and Mount 2 minutes and every other call 1 minute (moby
// volume/drivers/proxy.go). Stopping a little earlier lets the driver roll back and answer with a
// real error instead of Docker's timeout.
const (
	longCall  = 110 * time.Second
	shortCall = 55 * time.Second
)

func callCtx(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d)
}

// done logs a call's outcome once, here at the edge, with the volume's fields.
func (a *volumeAPI) done(call, name string, start time.Time, err error) error {
	a.m.observe(call, start, err)
	l := a.log.WithFields(logrus.Fields{"call": call, "volume": name, "took": time.Since(start).Round(time.Millisecond).String()})
	if err != nil {
		l.WithError(err).Warn("request failed")
		return err
	}
	l.Debug("request done")
	return nil
}

func (a *volumeAPI) Create(r *volume.CreateRequest) error {
	ctx, cancel := callCtx(longCall)
	defer cancel()
	start := time.Now()
	return a.done("create", r.Name, start, a.d.Create(ctx, r.Name, r.Options))
}

func (a *volumeAPI) Remove(r *volume.RemoveRequest) error {
	ctx, cancel := callCtx(shortCall)
	defer cancel()
	start := time.Now()
	return a.done("remove", r.Name, start, a.d.Remove(ctx, r.Name))
}

func (a *volumeAPI) Mount(r *volume.MountRequest) (*volume.MountResponse, error) {
	ctx, cancel := callCtx(longCall)
	defer cancel()
	start := time.Now()
	mp, err := a.d.Mount(ctx, r.Name, r.ID)
	a.reap.touch(r.Name)
	if err := a.done("mount", r.Name, start, err); err != nil {
		return nil, err
	}
	return &volume.MountResponse{Mountpoint: mp}, nil
}

func (a *volumeAPI) Unmount(r *volume.UnmountRequest) error {
	ctx, cancel := callCtx(shortCall)
	defer cancel()
	start := time.Now()
	err := a.d.Unmount(ctx, r.Name, r.ID)
	a.reap.touch(r.Name)
	return a.done("unmount", r.Name, start, err)
}

func (a *volumeAPI) Path(r *volume.PathRequest) (*volume.PathResponse, error) {
	mp, err := a.d.Path(r.Name)
	if err != nil {
		return nil, a.done("path", r.Name, time.Now(), err)
	}
	return &volume.PathResponse{Mountpoint: mp}, nil
}

func (a *volumeAPI) Get(r *volume.GetRequest) (*volume.GetResponse, error) {
	ctx, cancel := callCtx(shortCall)
	defer cancel()
	in, err := a.d.Get(ctx, r.Name)
	if err != nil {
		return nil, a.done("get", r.Name, time.Now(), err)
	}
	return &volume.GetResponse{Volume: dockerVolume(in, a.d.Backend())}, nil
}

func (a *volumeAPI) List() (*volume.ListResponse, error) {
	infos := a.d.List()
	out := &volume.ListResponse{Volumes: make([]*volume.Volume, 0, len(infos))}
	for _, in := range infos {
		out.Volumes = append(out.Volumes, &volume.Volume{Name: in.Name, Mountpoint: in.Mountpoint, CreatedAt: in.CreatedAt.Format(time.RFC3339)})
	}
	return out, nil
}

// Capabilities: volumes live on this host only.
func (a *volumeAPI) Capabilities() *volume.CapabilitiesResponse {
	return &volume.CapabilitiesResponse{Capabilities: volume.Capability{Scope: "local"}}
}

// dockerVolume renders a volume for `docker volume inspect`, whose Status shows where it came
// from, its space and its mount state.
func dockerVolume(in driver.Info, backend string) *volume.Volume {
	st := map[string]interface{}{
		"backend": backend,
		"source":  in.Source,
		"type":    string(in.Kind),
		"origin":  origin(in.Volume),
		"created": in.CreatedAt.Format(time.RFC3339),
		"mounted": in.Mounts > 0,
		"mounts":  in.Mounts,
	}
	if in.Golden != "" {
		st["golden"] = in.Golden
	}
	if in.ForkOf != "" {
		st["fork_of"] = in.ForkOf
	}
	if in.Generation > 0 {
		st["generation"] = in.Generation
	}
	if u := in.Usage; u != nil {
		st["size"] = humanBytes(u.Size)
		st["size_bytes"] = u.Size
		st["logical_bytes"] = u.Logical
		st["written_bytes"] = u.Written
		st["written"] = humanBytes(u.Written)
		if u.Device != "" {
			st["device"] = u.Device
		}
	}
	return &volume.Volume{Name: in.Name, Mountpoint: in.Mountpoint, CreatedAt: in.CreatedAt.Format(time.RFC3339), Status: st}
}

func origin(v driver.Volume) string {
	switch {
	case v.ForkOf != "" && v.Golden != "" && !v.ColdStart:
		return fmt.Sprintf("fork of volume %q (a clone of golden %q generation %d)", v.ForkOf, v.Golden, v.Generation)
	case v.ForkOf != "":
		return fmt.Sprintf("fork of volume %q", v.ForkOf)
	case v.ColdStart:
		return fmt.Sprintf("cold start: golden %q had no generation yet", v.Golden)
	case v.Golden != "":
		return fmt.Sprintf("clone of golden %q generation %d", v.Golden, v.Generation)
	default:
		return "empty volume (no golden)"
	}
}

func humanBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
