package main

import (
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/zgolden/zgolden/driver"
	"github.com/zgolden/zgolden/zfsutil"
)

// serveConfig is every setting of `zgolden serve`, parsed once from flags with environment
// fallbacks (ZGOLDEN_*), which is how a managed plugin is configured (`docker plugin set`).
type serveConfig struct {
	Backend         string
	Parent          string
	Root            string
	StoreSize       uint64
	MountRoot       string
	StateDir        string
	Spares          int
	RecordDir       string
	Nice            int
	MetricsListen   string
	SwarmLabels     string
	SwarmManager    string
	Reserve         driver.Reserve
	ReapUnusedAfter time.Duration
	ZFSProven       []string
	zfsProven       string
	Socket          string
	AdminSocket     string
	DefaultSize     uint64
	Volblocksize    string
	Compression     string
	Discard         bool
	ImportWait      time.Duration
	WaitPool        time.Duration
	KeepGenerations int
	LegacyGoldens   string
	LegacyRemove    bool
	Adopt           bool
	LogLevel        string
	LogFormat       string
}

// envFlag registers a flag whose default comes from the environment variable env when it is set.
type flagSet struct {
	*flag.FlagSet
	errs []string
}

func (f *flagSet) str(p *string, name, env, def, usage string) {
	if v, ok := os.LookupEnv(env); ok {
		def = v
	}
	f.StringVar(p, name, def, usage+" ($"+env+")")
}

func (f *flagSet) boolean(p *bool, name, env string, def bool, usage string) {
	if v, ok := os.LookupEnv(env); ok {
		b, err := strconv.ParseBool(v)
		if err != nil {
			f.errs = append(f.errs, fmt.Sprintf("$%s=%q is not a boolean", env, v))
		}
		def = b
	}
	f.BoolVar(p, name, def, usage+" ($"+env+")")
}

func (f *flagSet) duration(p *time.Duration, name, env string, def time.Duration, usage string) {
	if v, ok := os.LookupEnv(env); ok {
		d, err := time.ParseDuration(v)
		if err != nil {
			f.errs = append(f.errs, fmt.Sprintf("$%s=%q is not a duration such as 90s", env, v))
		}
		def = d
	}
	f.DurationVar(p, name, def, usage+" ($"+env+")")
}

func (f *flagSet) integer(p *int, name, env string, def int, usage string) {
	if v, ok := os.LookupEnv(env); ok {
		n, err := strconv.Atoi(v)
		if err != nil {
			f.errs = append(f.errs, fmt.Sprintf("$%s=%q is not an integer", env, v))
		}
		def = n
	}
	f.IntVar(p, name, def, usage+" ($"+env+")")
}

func parseServe(args []string) (serveConfig, error) {
	var c serveConfig
	fs := &flagSet{FlagSet: flag.NewFlagSet("zgolden serve", flag.ContinueOnError)}
	var storeSize, defaultSize, reserve string
	fs.str(&c.Backend, "backend", "ZGOLDEN_BACKEND", "auto", "auto, zfs or reflink: auto uses ZFS when the zfs tools, /dev/zfs and the parent's pool are present, the reflink store otherwise")
	fs.str(&c.Parent, "parent", "ZGOLDEN_PARENT", "", "ZFS parent dataset that holds every volume and golden, such as tank/zgolden (required for ZFS)")
	fs.str(&c.Root, "root", "ZGOLDEN_ROOT", "/var/lib/zgolden", "reflink store: directory for golden and volume images")
	fs.str(&storeSize, "store-size", "ZGOLDEN_STORE_SIZE", "200G", "reflink store: size of the sparse XFS store file made when --root cannot reflink")
	fs.str(&c.MountRoot, "mount-root", "ZGOLDEN_MOUNT_ROOT", "/var/lib/zgolden/mounts", "where volumes are mounted, one directory per volume (for a managed plugin: under its propagated mount)")
	fs.str(&c.StateDir, "state-dir", "ZGOLDEN_STATE_DIR", "/run/zgolden", "mount references and the admin socket; under /run so a reboot clears it with the mounts")
	fs.str(&c.Socket, "socket", "ZGOLDEN_SOCKET", "/run/docker/plugins/zgolden.sock", "Docker plugin socket")
	fs.str(&c.AdminSocket, "admin-socket", "ZGOLDEN_ADMIN_SOCKET", "", "admin socket for the zgolden command line (default STATE_DIR/admin.sock)")
	fs.str(&defaultSize, "default-size", "ZGOLDEN_DEFAULT_SIZE", "100G", "size of volumes created without a golden or -o size (sparse: costs nothing until written)")
	fs.str(&c.Volblocksize, "volblocksize", "ZGOLDEN_VOLBLOCKSIZE", "8K", "ZFS volblocksize of new zvols; 8K keeps XFS's 4K metadata writes from amplifying")
	fs.str(&c.Compression, "compression", "ZGOLDEN_COMPRESSION", "lz4", "ZFS compression of new datasets")
	fs.boolean(&c.Discard, "discard", "ZGOLDEN_DISCARD", true, "mount XFS with discard, so space freed inside a volume returns to the pool or store")
	fs.duration(&c.ImportWait, "import-wait", "ZGOLDEN_IMPORT_WAIT", 90*time.Second, "how long a Create waits for its project's running golden import before failing with a retryable error (Docker allows 2m)")
	fs.duration(&c.WaitPool, "wait-pool", "ZGOLDEN_WAIT_POOL", 0, "at start-up, wait this long for the ZFS pool to be imported before giving up (for boot ordering)")
	fs.integer(&c.KeepGenerations, "keep-generations", "ZGOLDEN_KEEP_GENERATIONS", 1, "after a promotion, keep this many newest generations of the project; older ones are reclaimed once no volume uses them (0 disables automatic reclaim)")
	fs.str(&c.LegacyGoldens, "legacy-goldens", "ZGOLDEN_LEGACY_GOLDENS", "", "directory pattern of file-based goldens, such as /srv/golden/{project}: a Create for a project with no golden imports its directory in the background")
	fs.boolean(&c.LegacyRemove, "legacy-remove", "ZGOLDEN_LEGACY_REMOVE", false, "delete a legacy golden directory once its import is verified and complete")
	fs.integer(&c.Spares, "spares", "ZGOLDEN_SPARES", 2, "warm clones of each block project's newest generation to keep ready, their XFS mounted, so a Create on a busy pool runs no zfs command (ZFS) or no reflink (reflink store) and its Mount is a bind (0: none)")
	fs.str(&c.zfsProven, "zfs-proven", "ZGOLDEN_ZFS_PROVEN", "", "ZFS: module series (such as 2.3,2.4) the zfs userland may drive besides its own; the managed plugin sets those its bundled userland passed the suites on")
	fs.str(&c.RecordDir, "record-dir", "ZGOLDEN_RECORD_DIR", "/var/lib/zgolden/zfs-records", "ZFS: where claims of spares and removals are recorded (RECORD_DIR/PARENT/records); must survive reboots, and is cheapest on ext4 or XFS")
	fs.str(&reserve, "reserve", "ZGOLDEN_RESERVE", "0", "free space (50G, or 10% of the pool or store) that new volumes, imports and promotions leave alone; running volumes keep writing into it (0: none)")
	fs.duration(&c.ReapUnusedAfter, "reap-unused-after", "ZGOLDEN_REAP_UNUSED_AFTER", 0, "remove volumes that no container, running or stopped, has referenced for this long, asking the Docker engine (at least 10m; 0: never)")
	fs.str(&c.MetricsListen, "metrics-listen", "ZGOLDEN_METRICS_LISTEN", "", "serve Prometheus metrics and /healthz on HOST:PORT or unix:PATH (off when empty)")
	fs.str(&c.SwarmLabels, "swarm-labels", "ZGOLDEN_SWARM_LABELS", "", "publish the goldens this host holds as labels PREFIX.* on its Swarm node, for placement constraints, such as --swarm-labels zgolden (off when empty)")
	fs.str(&c.SwarmManager, "swarm-manager", "ZGOLDEN_SWARM_MANAGER", "", "with --swarm-labels on a worker node: a manager's Docker engine (tcp://HOST:2376, TLS from $DOCKER_CERT_PATH) to write the labels through")
	fs.boolean(&c.Adopt, "adopt", "ZGOLDEN_ADOPT", false, "use a parent dataset or root that already holds things zgolden did not create")
	fs.integer(&c.Nice, "nice", "ZGOLDEN_NICE", -10, "CPU priority of the plugin's threads, -20 (first) to 19; below 0 runs Docker's requests ahead of the sessions' builds on a busy host (0: as started)")
	fs.str(&c.LogLevel, "log-level", "ZGOLDEN_LOG_LEVEL", "info", "debug, info, warn or error")
	fs.str(&c.LogFormat, "log-format", "ZGOLDEN_LOG_FORMAT", "text", "text or json")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		fs.errs = append(fs.errs, fmt.Sprintf("unexpected arguments %q", fs.Args()))
	}
	var err error
	if c.StoreSize, err = driver.ParseSize(storeSize); err != nil {
		fs.errs = append(fs.errs, "--store-size: "+err.Error())
	}
	if c.DefaultSize, err = driver.ParseSize(defaultSize); err != nil {
		fs.errs = append(fs.errs, "--default-size: "+err.Error())
	}
	switch c.Backend {
	case "auto", "zfs", "reflink":
	default:
		fs.errs = append(fs.errs, fmt.Sprintf("--backend %q must be auto, zfs or reflink", c.Backend))
	}
	if c.LegacyGoldens != "" && (!strings.Contains(c.LegacyGoldens, "{project}") || !strings.HasPrefix(c.LegacyGoldens, "/")) {
		fs.errs = append(fs.errs, fmt.Sprintf("--legacy-goldens %q must be an absolute path containing {project}", c.LegacyGoldens))
	}
	if c.Nice < -20 || c.Nice > 19 {
		fs.errs = append(fs.errs, fmt.Sprintf("--nice %d must be from -20 (first) to 19 (last); 0 leaves the priority as started", c.Nice))
	}
	if c.Spares < 0 || c.Spares > 64 {
		fs.errs = append(fs.errs, fmt.Sprintf("--spares %d must be between 0 and 64 per project", c.Spares))
	}
	if !strings.HasPrefix(c.RecordDir, "/") || strings.HasPrefix(c.RecordDir, "/run/") {
		fs.errs = append(fs.errs, fmt.Sprintf("--record-dir %q must be an absolute path that survives reboots (not under /run)", c.RecordDir))
	}
	if c.ReapUnusedAfter != 0 && c.ReapUnusedAfter < reapMin {
		fs.errs = append(fs.errs, fmt.Sprintf("--reap-unused-after %s is shorter than %s: a volume and the container that mounts it can be minutes apart", c.ReapUnusedAfter, reapMin))
	}
	if c.Reserve, err = driver.ParseReserve(reserve); err != nil {
		fs.errs = append(fs.errs, "--reserve: "+err.Error())
	}
	if err := validMetricsListen(c.MetricsListen); err != nil {
		fs.errs = append(fs.errs, err.Error())
	}
	if err := validLabelPrefix(c.SwarmLabels); err != nil {
		fs.errs = append(fs.errs, err.Error())
	}
	if c.SwarmManager != "" && c.SwarmLabels == "" {
		fs.errs = append(fs.errs, "--swarm-manager is for --swarm-labels, which is not set")
	}
	if p, err := zfsutil.ParseProven(c.zfsProven); err != nil {
		fs.errs = append(fs.errs, "--zfs-proven: "+err.Error())
	} else {
		c.ZFSProven = p
	}
	if c.AdminSocket == "" {
		c.AdminSocket = c.StateDir + "/admin.sock"
	}
	if len(fs.errs) > 0 {
		return c, fmt.Errorf("serve: %s", strings.Join(fs.errs, "; "))
	}
	return c, nil
}
