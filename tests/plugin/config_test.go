package plugin

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

// pluginConfig is the part of Docker's plugin config.json that zgolden depends on.
type pluginConfig struct {
	Entrypoint []string
	Interface  struct {
		Types  []string
		Socket string
	}
	Network         struct{ Type string }
	PropagatedMount string
	Linux           struct {
		Capabilities    []string
		AllowAllDevices bool
		Devices         []any
	}
	Mounts []struct {
		Name, Source, Destination, Type string
		Options, Settable               []string
	}
	Env []struct {
		Name, Value string
		Settable    []string
	}
}

// TestPluginConfig checks config.json against what zgolden and Docker need, without Docker: a
// mistake here otherwise shows only when a user enables the plugin. No root needed.
func TestPluginConfig(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(repo(t), "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	dec := json.NewDecoder(strings.NewReader(string(data)))
	var c pluginConfig
	if err := dec.Decode(&c); err != nil {
		t.Fatalf("config.json: %v", err)
	}
	if !slices.Equal(c.Entrypoint, []string{"/usr/bin/zgolden", "serve"}) {
		t.Errorf("entrypoint %v: build-plugin.sh installs zgolden at /usr/bin/zgolden", c.Entrypoint)
	}
	// zgolden serve's default --socket is /run/docker/plugins/zgolden.sock, and Docker mounts the
	// plugin's socket directory at /run/docker/plugins.
	if !slices.Equal(c.Interface.Types, []string{"docker.volumedriver/1.0"}) || c.Interface.Socket != "zgolden.sock" {
		t.Errorf("interface %+v: want docker.volumedriver/1.0 on zgolden.sock", c.Interface)
	}
	if c.Network.Type != "none" {
		t.Errorf("network %q: zgolden talks only over unix sockets, so none", c.Network.Type)
	}
	if !slices.Equal(c.Linux.Capabilities, []string{"CAP_SYS_ADMIN", "CAP_SYS_NICE"}) {
		t.Errorf("capabilities %v: zgolden needs CAP_SYS_ADMIN (mount, loop, zfs ioctls, FIFREEZE), CAP_SYS_NICE (--nice: its requests ahead of the sessions' builds) and no more", c.Linux.Capabilities)
	}
	if !c.Linux.AllowAllDevices || len(c.Linux.Devices) != 0 {
		t.Errorf("devices: allowAllDevices=%v devices=%v; zvols and loop devices appear with new minors after the plugin starts, so device entries (fixed at enable time) cannot cover them", c.Linux.AllowAllDevices, c.Linux.Devices)
	}
	if c.PropagatedMount == "" {
		t.Fatal("no propagatedMount: Docker only sees a managed plugin's mounts under it")
	}

	env := map[string]string{}
	settable := map[string]bool{}
	for _, e := range c.Env {
		env[e.Name] = e.Value
		settable[e.Name] = slices.Contains(e.Settable, "value")
	}
	under := func(name, dir string) {
		if v := env[name]; !strings.HasPrefix(v, dir+"/") {
			t.Errorf("%s=%q must be below %s", name, v, dir)
		}
	}
	under("ZGOLDEN_MOUNT_ROOT", c.PropagatedMount)
	if settable["ZGOLDEN_MOUNT_ROOT"] || settable["ZGOLDEN_STATE_DIR"] {
		t.Error("ZGOLDEN_MOUNT_ROOT and ZGOLDEN_STATE_DIR must not be settable: their places are fixed by the mounts")
	}

	var dev, dataMount, docker bool
	for _, m := range c.Mounts {
		switch m.Name {
		case "dev":
			dev = m.Source == "/dev" && m.Destination == "/dev" && m.Type == "bind" && slices.Contains(m.Options, "rbind")
		case "data":
			dataMount = m.Source == m.Destination && m.Type == "bind" && slices.Contains(m.Settable, "source")
			under("ZGOLDEN_STATE_DIR", m.Destination)
			under("ZGOLDEN_ROOT", m.Destination)
		case "docker":
			// Where the Docker client looks by default (plugin/docker.go), and settable, so an
			// administrator can deny the plugin the engine.
			docker = m.Source == "/var/run/docker.sock" && m.Destination == "/var/run/docker.sock" && m.Type == "bind" && slices.Contains(m.Settable, "source")
		default:
			t.Errorf("mount %q: config.json declares only dev, data and docker", m.Name)
		}
	}
	if !dev || !dataMount || !docker {
		t.Errorf("mounts %+v: want the host's /dev (rbind), a settable data directory mounted at the same path, and the engine's socket at its own path, settable", c.Mounts)
	}

	// Every variable must be one zgolden serve reads (a typo would be silently ignored).
	src, err := os.ReadFile(filepath.Join(repo(t), "plugin", "config.go"))
	if err != nil {
		t.Fatal(err)
	}
	known := map[string]bool{}
	for _, m := range regexp.MustCompile(`"(ZGOLDEN_[A-Z_]+)"`).FindAllStringSubmatch(string(src), -1) {
		known[m[1]] = true
	}
	for name := range env {
		if !known[name] {
			t.Errorf("config.json sets %s, which plugin/config.go does not read", name)
		}
	}
	// The settings users change with `docker plugin set`.
	for _, name := range []string{"ZGOLDEN_BACKEND", "ZGOLDEN_PARENT", "ZGOLDEN_ROOT", "ZGOLDEN_STORE_SIZE",
		"ZGOLDEN_DEFAULT_SIZE", "ZGOLDEN_VOLBLOCKSIZE", "ZGOLDEN_COMPRESSION", "ZGOLDEN_DISCARD",
		"ZGOLDEN_IMPORT_WAIT", "ZGOLDEN_WAIT_POOL", "ZGOLDEN_KEEP_GENERATIONS", "ZGOLDEN_LEGACY_GOLDENS",
		"ZGOLDEN_LEGACY_REMOVE", "ZGOLDEN_ADOPT", "ZGOLDEN_LOG_LEVEL", "ZGOLDEN_LOG_FORMAT", "ZGOLDEN_SWARM_LABELS"} {
		if _, ok := env[name]; !ok || !settable[name] {
			t.Errorf("%s is missing or not settable with docker plugin set", name)
		}
	}
	// Docker gives a managed plugin about 10 s to listen (3 dials 3 s apart) and then disables it.
	if d, err := time.ParseDuration(env["ZGOLDEN_WAIT_POOL"]); err != nil || d >= 9*time.Second {
		t.Errorf("ZGOLDEN_WAIT_POOL=%q: must be a duration under 9s, or Docker disables the plugin before it listens", env["ZGOLDEN_WAIT_POOL"])
	}
}
