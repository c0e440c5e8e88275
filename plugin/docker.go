package main

import (
	"context"
	"fmt"
	"os"
	"strings"

	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/client"
)

// engine is the Docker engine's view of zgolden's volumes, through the Docker API: which
// containers, running or stopped, use a volume. Docker never tells a volume plugin (moby #36212:
// labels and references stay in the engine), so busy errors and reaping ask it. The host daemon
// reaches it at /var/run/docker.sock (or $DOCKER_HOST), and so does the managed plugin, through
// the bind of the host's socket that config.json asks for.
type engine struct{ c *client.Client }

func newEngine() (*engine, error) {
	c, err := client.NewClientWithOpts(localEngineOpts()...)
	if err != nil {
		return nil, fmt.Errorf("docker client: %w", err)
	}
	return &engine{c: c}, nil
}

// localEngineOpts reach the local engine: $DOCKER_HOST or the default socket. $DOCKER_CERT_PATH
// and $DOCKER_TLS_VERIFY are for an engine over TCP (the --swarm-manager on a worker), and only
// apply here when $DOCKER_HOST is one: over the unix socket they would make the client speak
// TLS to a plain socket, and every call fail.
func localEngineOpts() []client.Opt {
	opts := []client.Opt{client.WithHostFromEnv(), client.WithVersionFromEnv(), client.WithAPIVersionNegotiation()}
	if h := os.Getenv(client.EnvOverrideHost); strings.HasPrefix(h, "tcp://") || strings.HasPrefix(h, "https://") {
		opts = append(opts, client.WithTLSClientConfigFromEnv())
	}
	return opts
}

// using lists the containers, in any state, that use volume.
func (e *engine) using(ctx context.Context, volume string) ([]container.Summary, error) {
	return e.c.ContainerList(ctx, container.ListOptions{All: true, Filters: filters.NewArgs(filters.Arg("volume", volume))})
}

// holders names the containers that use volume, with their state: "web-1 (running)".
func (e *engine) holders(ctx context.Context, volume string) ([]string, error) {
	cs, err := e.using(ctx, volume)
	if err != nil {
		return nil, err
	}
	out := make([]string, 0, len(cs))
	for _, c := range cs {
		name := c.ID[:min(12, len(c.ID))]
		if len(c.Names) > 0 {
			name = strings.TrimPrefix(c.Names[0], "/")
		}
		out = append(out, fmt.Sprintf("%s (%s)", name, c.State))
	}
	return out, nil
}

// active says whether a container in any state but exited or dead uses volume: one that runs,
// is paused or restarting, or is being created or started, may hold a mount of it.
func (e *engine) active(ctx context.Context, volume string) (bool, error) {
	cs, err := e.using(ctx, volume)
	if err != nil {
		return false, err
	}
	for _, c := range cs {
		if c.State != "exited" && c.State != "dead" {
			return true, nil
		}
	}
	return false, nil
}

// inUse is every volume name that some container, running or stopped, mounts.
func (e *engine) inUse(ctx context.Context) (map[string]bool, error) {
	cs, err := e.c.ContainerList(ctx, container.ListOptions{All: true})
	if err != nil {
		return nil, err
	}
	used := map[string]bool{}
	for _, c := range cs {
		for _, m := range c.Mounts {
			if m.Type == "volume" && m.Name != "" {
				used[m.Name] = true
			}
		}
	}
	return used, nil
}

// removeVolume removes a volume through Docker, which refuses one a container still references
// (its own check, atomic with its bookkeeping) and then calls the plugin's Remove.
func (e *engine) removeVolume(ctx context.Context, name string) error {
	return e.c.VolumeRemove(ctx, name, false)
}
