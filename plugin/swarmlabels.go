package main

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/api/types/swarm"
	"github.com/docker/docker/api/types/volume"
	"github.com/docker/docker/client"
	"github.com/sirupsen/logrus"

	"github.com/zgolden/zgolden/driver"
)

// Swarm node labels (--swarm-labels PREFIX): which goldens this host holds, published on the
// host's own Swarm node, so that a service's placement constraint runs a session only on a node
// that can clone its golden at once.
//
// The labels, each under PREFIX:
//
//	PREFIX.backend=zfs|reflink          the store, since goldens move only between like stores
//	PREFIX.golden.PROJECT=true          the host holds at least one generation of PROJECT
//	PREFIX.newest.PROJECT=N             the newest generation it holds
//	PREFIX.guid.PROJECT=GUID            that generation's guid, when known (the same bytes fleet-wide)
//	PREFIX.generation.PROJECT.N=true    each generation it holds, for sessions that pin generation=N
//
// Swarm's constraints compare a label with == or != only, so presence is a label of its own.
//
// The rules:
//   - Only labels under "PREFIX." are written or removed; every other label of the node is kept.
//   - A pass compares what the host holds with what the node carries and writes the node only
//     when they differ, with the node's version, so an update racing another writer of the node
//     fails and is tried again instead of losing the other's labels.
//   - A pass runs at start, every labelInterval, and at once after an admin verb that can change
//     the goldens (import, promote, reclaim, golden rm, receive). A golden that appears another
//     way (a legacy import behind a Create) is seen by the next timed pass.
//   - Node labels can only be written through a manager: the local engine when this node is one,
//     otherwise the engine --swarm-manager names. A node that is in no swarm gets nothing, and is
//     looked at again at the next pass.
//   - The labels stay when zgolden stops: the goldens stay on the host.
//   - Swarm places a task that mounts a volume of a driver only on a node whose description lists
//     that driver, and an engine lists a plugin it finds by its socket (the host daemon, not the
//     managed plugin) only once something has used it. So a pass whose node does not list the
//     plugin lists its volumes through the engine, which makes the engine load it; the node's
//     description follows within Swarm's next node update (about 20 s).
type labeler struct {
	d      *driver.Driver
	prefix string
	store  string // backend name
	plugin string // the name Docker knows the plugin by
	local  *client.Client
	mgr    *client.Client // nil: the local engine, when it is a manager
	log    *logrus.Entry
	kickc  chan struct{}

	mu   sync.Mutex
	last labelState
}

// labelState is the outcome of the last pass, for doctor.
type labelState struct {
	At     time.Time
	Node   string
	Labels map[string]string
	Err    error
}

// labelInterval is the period of the timed passes: a read of the goldens and of the node.
const labelInterval = 15 * time.Second

var labelPrefixRE = regexp.MustCompile(`^[a-z][a-z0-9-]*(\.[a-z][a-z0-9-]*)*$`)

func validLabelPrefix(p string) error {
	if p != "" && (!labelPrefixRE.MatchString(p) || len(p) > 64) {
		return fmt.Errorf("--swarm-labels %q: want a label prefix such as zgolden (lower-case words joined by dots)", p)
	}
	return nil
}

// newLabeler publishes through local, the engine's client serve already has, or through the
// manager's engine when one is named.
func newLabeler(d *driver.Driver, local *client.Client, prefix, manager, store, plugin string, log *logrus.Entry) (*labeler, error) {
	var err error
	l := &labeler{d: d, prefix: prefix, store: store, plugin: plugin, local: local, log: log.WithField("worker", "swarm-labels"), kickc: make(chan struct{}, 1)}
	if manager != "" {
		// FromEnv first, so DOCKER_CERT_PATH and DOCKER_TLS_VERIFY give the manager's TLS.
		if l.mgr, err = client.NewClientWithOpts(client.FromEnv, client.WithHost(manager), client.WithAPIVersionNegotiation()); err != nil {
			return nil, fmt.Errorf("--swarm-manager %q: %w", manager, err)
		}
	}
	return l, nil
}

// kick asks for a pass soon; it never blocks.
func (l *labeler) kick() {
	if l == nil {
		return
	}
	select {
	case l.kickc <- struct{}{}:
	default:
	}
}

func (l *labeler) run(ctx context.Context) {
	t := time.NewTicker(labelInterval)
	defer t.Stop()
	for {
		pctx, cancel := context.WithTimeout(ctx, time.Minute)
		st := l.pass(pctx)
		cancel()
		l.mu.Lock()
		prev := l.last
		l.last = st
		l.mu.Unlock()
		switch {
		case st.Err != nil && (prev.Err == nil || prev.Err.Error() != st.Err.Error()):
			l.log.WithError(st.Err).Warn("swarm node labels not published")
		case st.Err == nil && !maps.Equal(prev.Labels, st.Labels):
			l.log.WithFields(logrus.Fields{"node": st.Node, "labels": len(st.Labels)}).Info("swarm node labels published")
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-l.kickc:
		}
	}
}

// errNoSwarm says the engine is in no swarm: nothing to publish, and nothing wrong.
var errNoSwarm = errors.New("this Docker engine is not part of a swarm")

// pass publishes the labels once; see the rules on labeler.
func (l *labeler) pass(ctx context.Context) labelState {
	st := labelState{At: time.Now()}
	info, err := l.local.Info(ctx)
	if err != nil {
		st.Err = fmt.Errorf("cannot ask the local Docker engine which swarm node it is: %w", err)
		return st
	}
	if info.Swarm.LocalNodeState != swarm.LocalNodeStateActive || info.Swarm.NodeID == "" {
		st.Err = errNoSwarm
		return st
	}
	st.Node = info.Swarm.NodeID
	mgr := l.mgr
	if mgr == nil {
		if !info.Swarm.ControlAvailable {
			st.Err = fmt.Errorf("node %s is a swarm worker, and node labels can only be written through a manager: start zgolden with --swarm-manager naming a manager's engine", st.Node)
			return st
		}
		mgr = l.local
	}
	gs, err := l.d.Goldens(ctx)
	if err != nil {
		st.Err = fmt.Errorf("listing the goldens: %w", err)
		return st
	}
	st.Labels = goldenLabels(l.prefix, l.store, gs)
	// A write that races another writer of the node fails on the version; read again and retry.
	for try := 0; ; try++ {
		node, _, err := mgr.NodeInspectWithRaw(ctx, st.Node)
		if err != nil {
			st.Err = fmt.Errorf("reading swarm node %s: %w", st.Node, err)
			return st
		}
		if try == 0 && !listsPlugin(node, l.plugin) {
			// Listing the driver's volumes makes the engine load the plugin (see the rules).
			_, err := l.local.VolumeList(ctx, volume.ListOptions{Filters: filters.NewArgs(filters.Arg("driver", l.plugin))})
			l.log.WithError(err).WithField("plugin", l.plugin).Info("the swarm node does not list the plugin yet; listed its volumes through the engine so that it does")
		}
		spec, changed := withLabels(node.Spec, l.prefix, st.Labels)
		if !changed {
			return st
		}
		err = mgr.NodeUpdate(ctx, st.Node, node.Version, spec)
		if err == nil {
			return st
		}
		if try == 4 || !strings.Contains(err.Error(), "out of sequence") {
			st.Err = fmt.Errorf("writing the labels of swarm node %s: %w", st.Node, err)
			return st
		}
	}
}

// listsPlugin says whether the node's description has the volume plugin, by its name with or
// without a tag.
func listsPlugin(node swarm.Node, name string) bool {
	if node.Description.Engine.Plugins == nil {
		return false
	}
	for _, p := range node.Description.Engine.Plugins {
		if p.Type == "Volume" && (p.Name == name || strings.HasPrefix(p.Name, name+":")) {
			return true
		}
	}
	return false
}

// goldenLabels is the label set for what the host holds (see labeler).
func goldenLabels(prefix, store string, gs []driver.Golden) map[string]string {
	out := map[string]string{prefix + ".backend": store}
	for _, g := range gs {
		newest := g.Newest()
		if newest == nil {
			continue // an import's first generation is not there yet
		}
		out[prefix+".golden."+g.Project] = "true"
		out[prefix+".newest."+g.Project] = strconv.Itoa(newest.Number)
		if newest.GUID != "" {
			out[prefix+".guid."+g.Project] = newest.GUID
		}
		for _, gen := range g.Generations {
			out[fmt.Sprintf("%s.generation.%s.%d", prefix, g.Project, gen.Number)] = "true"
		}
	}
	return out
}

// withLabels returns spec with its labels under prefix replaced by want, and whether that
// changes anything. Labels outside the prefix are kept as they are.
func withLabels(spec swarm.NodeSpec, prefix string, want map[string]string) (swarm.NodeSpec, bool) {
	labels := map[string]string{}
	for k, v := range spec.Labels {
		if !strings.HasPrefix(k, prefix+".") {
			labels[k] = v
		}
	}
	maps.Copy(labels, want)
	if maps.Equal(labels, spec.Labels) || len(labels) == 0 && len(spec.Labels) == 0 {
		return spec, false
	}
	spec.Labels = labels
	return spec, true
}

// finding is the doctor's view of the last pass.
func (l *labeler) finding() driver.Finding {
	f := driver.Finding{Check: "swarm labels"}
	l.mu.Lock()
	st := l.last
	l.mu.Unlock()
	switch {
	case st.At.IsZero():
		f.Level, f.Detail = driver.LevelOK, "the first pass has not finished yet"
	case errors.Is(st.Err, errNoSwarm):
		f.Level, f.Detail = driver.LevelOK, "not published: "+st.Err.Error()
	case st.Err != nil:
		f.Level, f.Detail = driver.LevelProblem, st.Err.Error()
		f.Action = "placement constraints on " + l.prefix + ".* labels will not find this host until this is fixed"
	default:
		keys := slices.Sorted(maps.Keys(st.Labels))
		f.Level = driver.LevelOK
		f.Detail = fmt.Sprintf("node %s carries %d %s.* labels (%s), as of %s", st.Node, len(keys), l.prefix, strings.Join(keys, ", "), st.At.UTC().Format(time.RFC3339))
	}
	return f
}
