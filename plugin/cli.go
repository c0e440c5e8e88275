package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/zgolden/zgolden/driver"
)

// cli is what every admin subcommand shares: its flags, the admin socket, --json.
type cli struct {
	fs     *flag.FlagSet
	socket string
	json   bool
	args   []string
}

// helpOut is where a subcommand's usage goes; tests read it.
var helpOut io.Writer = os.Stderr

func newCLI(name string) *cli {
	c := &cli{fs: flag.NewFlagSet("zgolden "+name, flag.ContinueOnError)}
	c.fs.SetOutput(helpOut)
	def := os.Getenv("ZGOLDEN_ADMIN_SOCKET")
	if def == "" {
		def = "/run/zgolden/admin.sock"
	}
	c.fs.StringVar(&c.socket, "admin-socket", def, "admin socket of the running zgolden serve ($ZGOLDEN_ADMIN_SOCKET)")
	c.fs.BoolVar(&c.json, "json", false, "print JSON for scripts")
	c.fs.Usage = func() {
		fmt.Fprintf(c.fs.Output(), "Usage: zgolden %s\n\nFlags:\n", synopsis(name))
		c.fs.PrintDefaults()
	}
	return c
}

// parse accepts flags before and after positional arguments (`promote VOL --project P`), as
// docker and zfs users expect.
func (c *cli) parse(args []string, want int) error {
	for {
		if err := c.fs.Parse(args); err != nil {
			return err
		}
		args = c.fs.Args()
		if len(args) == 0 {
			break
		}
		c.args = append(c.args, args[0])
		args = args[1:]
	}
	if want >= 0 && len(c.args) != want {
		c.fs.Usage()
		return fmt.Errorf("expected %d argument(s), got %d", want, len(c.args))
	}
	return nil
}

func (c *cli) client() *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", c.socket)
		},
	}}
}

// call sends a request to the admin API and decodes its JSON answer into out.
func (c *cli) call(method, path string, body, out any) error {
	resp, err := c.do(method, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	return decodeReply(resp, out)
}

func (c *cli) do(method, path string, body any) (*http.Response, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, "http://zgolden"+path, rd)
	if err != nil {
		return nil, err
	}
	resp, err := c.client().Do(req)
	if err != nil {
		return nil, fmt.Errorf("cannot reach zgolden serve at %s (is it running, and are you root?): %w", c.socket, err)
	}
	return resp, nil
}

func decodeReply(resp *http.Response, out any) error {
	if resp.StatusCode >= 300 {
		var e errorResponse
		if json.NewDecoder(resp.Body).Decode(&e) == nil && e.Error != "" {
			return errors.New(e.Error)
		}
		return fmt.Errorf("admin API: %s", resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

func printJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func cmdStatus(args []string) error {
	c := newCLI("status")
	if err := c.parse(args, 0); err != nil {
		return err
	}
	var st driver.Status
	if err := c.call("GET", "/v1/status", nil, &st); err != nil {
		return err
	}
	if c.json {
		return printJSON(st)
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	for _, l := range statusLines(st) {
		fmt.Fprintf(tw, "%s:\t%s\n", l[0], l[1])
	}
	return tw.Flush()
}

// statusLines is `zgolden status` as text: each field under its JSON key, in the order a reader
// wants them, sizes in binary units; a field the backend did not report is left out.
func statusLines(st driver.Status) [][2]string {
	var out [][2]string
	add := func(k string, v any) { out = append(out, [2]string{k, fmt.Sprint(v)}) }
	addBytes := func(k string, n *uint64) {
		if n != nil {
			add(k, humanBytes(*n))
		}
	}
	add("backend", st.Backend)
	add("volumes", st.Volumes)
	add("mounted", st.Mounted)
	add("mount_root", st.MountRoot)
	addBytes("available_bytes", &st.AvailableBytes)
	addBytes("used_bytes", &st.UsedBytes)
	add("removed_pending", st.RemovedPending)
	add("kept_mounted", st.KeptMounted)
	add("spares_ready", st.SparesReady)
	add("spares_mounted", st.SparesMounted)
	add("claims_pending", st.ClaimsPending)
	if z := st.ZFSStatus; z != nil {
		add("parent", z.Parent)
		add("pool", z.Pool)
		add("zfs_module", z.ZFSModule)
		add("zfs_userland", z.ZFSUserland)
		add("zfs_proven", z.ZFSProven)
		if z.DDTEntries != nil {
			add("ddt_entries", *z.DDTEntries)
		}
		add("clone_sync_tasks", z.CloneSyncTasks)
		if z.TxgSyncLastSeconds != nil && z.TxgSyncMax10Seconds != nil {
			add("txg_sync_last_seconds", *z.TxgSyncLastSeconds)
			add("txg_sync_max10_seconds", *z.TxgSyncMax10Seconds)
		}
		add("spares_making", z.SparesMaking)
		add("creates_waiting", z.CreatesWaiting)
		add("settles_pending", z.SettlesPending)
		add("devices_held", z.DevicesHeld)
		add("cleanups_pending", z.CleanupsPending)
	}
	if r := st.ReflinkStatus; r != nil {
		add("root", r.Root)
		add("store", r.Store)
		add("store_mode", r.StoreMode)
		add("filesystem", r.Filesystem)
		addBytes("size_bytes", &r.SizeBytes)
		if r.StoreFile != "" {
			add("store_file", r.StoreFile)
		}
		addBytes("store_file_allocated_bytes", r.StoreFileAllocatedBytes)
		addBytes("host_available_bytes", r.HostAvailableBytes)
	}
	for _, p := range slices.Sorted(maps.Keys(st.Imports)) {
		add("import "+p, st.Imports[p])
	}
	return out
}

func cmdGoldenList(args []string) error {
	c := newCLI("golden ls")
	if err := c.parse(args, 0); err != nil {
		return err
	}
	var gs []driver.Golden
	if err := c.call("GET", "/v1/goldens", nil, &gs); err != nil {
		return err
	}
	if c.json {
		return printJSON(gs)
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PROJECT\tTYPE\tGENERATION\tNEWEST\tVOLUMES\tUNIQUE\tREFERENCED\tCREATED\tFROM")
	for _, g := range gs {
		if len(g.Generations) == 0 && g.Partial == nil {
			fmt.Fprintf(tw, "%s\t%s\t-\t\t\t\t\t\t%s\n", g.Project, g.Kind, map[bool]string{true: "(importing)", false: ""}[g.Importing])
		}
		if g.Partial != nil {
			fmt.Fprintf(tw, "%s\t%s\t%d\t\t\t\t\t\t(partial receive: the next transfer resumes it)\n", g.Project, g.Kind, g.Partial.Generation)
		}
		for i, gen := range g.Generations {
			newest := ""
			if i == len(g.Generations)-1 {
				newest = "*"
			}
			fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%d\t%s\t%s\t%s\t%s\n", g.Project, g.Kind, gen.Number, newest,
				len(gen.Dependents), humanBytes(gen.Used), humanBytes(gen.Referenced),
				gen.CreatedAt.Local().Format("2006-01-02 15:04"), gen.FromVolume)
		}
	}
	return tw.Flush()
}

func cmdGoldenPromote(args []string) error {
	c := newCLI("golden promote")
	project := c.fs.String("project", "", "project whose next generation the volume becomes (required)")
	if err := c.parse(args, 1); err != nil {
		return err
	}
	if *project == "" {
		return errors.New("golden promote: --project is required")
	}
	var resp promoteResponse
	if err := c.call("POST", "/v1/promote", promoteRequest{Volume: c.args[0], Project: *project}, &resp); err != nil {
		return err
	}
	if c.json {
		return printJSON(resp)
	}
	fmt.Printf("volume %s is now generation %d of golden %s\n", c.args[0], resp.Generation.Number, *project)
	for _, g := range resp.Reclaimed {
		fmt.Printf("reclaimed unused generation %d (%s)\n", g.Number, humanBytes(g.Used))
	}
	return nil
}

func cmdGoldenImport(args []string) error {
	c := newCLI("golden import")
	project := c.fs.String("project", "", "project to seed (required)")
	kind := c.fs.String("type", "block", "block (XFS image or zvol, for /var/lib/docker) or fs (ZFS dataset, for git workspaces)")
	removeSource := c.fs.Bool("remove-source", false, "delete DIR after the copy has been verified entry by entry and snapshotted")
	if err := c.parse(args, 1); err != nil {
		return err
	}
	if *project == "" {
		return errors.New("golden import: --project is required")
	}
	dir, err := filepath.Abs(c.args[0])
	if err != nil {
		return err
	}
	resp, err := c.do("POST", "/v1/import", importRequest{Project: *project, Dir: dir, Type: *kind, RemoveSource: *removeSource})
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		return decodeReply(resp, nil)
	}
	tty := isTerminal(os.Stderr)
	pr := &progressPrinter{start: time.Now(), tty: tty}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		var ev importEvent
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			return fmt.Errorf("admin API: %w", err)
		}
		switch {
		case ev.Error != "":
			pr.finish()
			return errors.New(ev.Error)
		case ev.Generation != nil:
			pr.finish()
			if c.json {
				return printJSON(ev.Generation)
			}
			fmt.Printf("imported %s as generation %d of golden %s in %s\n", dir, ev.Generation.Number, *project, time.Since(pr.start).Round(time.Second))
			return nil
		case ev.Progress != nil && !c.json:
			pr.show(*ev.Progress)
		}
	}
	if err := sc.Err(); err != nil {
		return err
	}
	return errors.New("the import ended without a result: check the zgolden serve logs")
}

// progressPrinter shows an import's progress: a live line on a terminal, a line every 10 s
// otherwise (for logs).
type progressPrinter struct {
	start   time.Time
	tty     bool
	printed time.Time
	live    bool
}

func (p *progressPrinter) show(pg driver.Progress) {
	if !p.tty && time.Since(p.printed) < 10*time.Second {
		return
	}
	p.printed = time.Now()
	line := pg.Phase
	if pg.BytesTotal > 0 || pg.FilesTotal > 0 {
		elapsed := time.Since(p.start).Seconds()
		rate := float64(pg.BytesDone) / max(elapsed, 0.001)
		frac := fraction(pg)
		eta := "?"
		if frac > 0.01 {
			eta = (time.Duration(elapsed/frac*(1-frac)) * time.Second).Round(time.Second).String()
		}
		line = fmt.Sprintf("%s: %d/%d files, %s/%s (%.0f%%), %s/s, ETA %s", pg.Phase, pg.FilesDone, pg.FilesTotal,
			humanBytes(uint64(max(pg.BytesDone, 0))), humanBytes(uint64(pg.BytesTotal)), frac*100, humanBytes(uint64(rate)), eta)
	}
	if p.tty {
		fmt.Fprintf(os.Stderr, "\r\033[K%s", line)
		p.live = true
	} else {
		fmt.Fprintln(os.Stderr, line)
	}
}

// fraction estimates how far a copy is, from bytes when the tree has data and files otherwise.
func fraction(pg driver.Progress) float64 {
	f := 0.0
	if pg.BytesTotal > 0 {
		f = float64(pg.BytesDone) / float64(pg.BytesTotal)
	} else if pg.FilesTotal > 0 {
		f = float64(pg.FilesDone) / float64(pg.FilesTotal)
	}
	return min(max(f, 0), 1)
}

func (p *progressPrinter) finish() {
	if p.live {
		fmt.Fprintln(os.Stderr)
	}
}

func isTerminal(f *os.File) bool {
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

func cmdGoldenReclaim(args []string) error {
	c := newCLI("golden reclaim")
	keep := c.fs.Int("keep", 1, "keep this many newest generations of each project")
	if err := c.parse(args, -1); err != nil {
		return err
	}
	if len(c.args) > 1 {
		return errors.New("golden reclaim takes at most one project")
	}
	req := reclaimRequest{Keep: *keep}
	if len(c.args) == 1 {
		req.Project = c.args[0]
	}
	var removed []driver.Generation
	if err := c.call("POST", "/v1/reclaim", req, &removed); err != nil {
		return err
	}
	if c.json {
		return printJSON(removed)
	}
	if len(removed) == 0 {
		fmt.Println("nothing to reclaim: every older generation is still used by a volume")
	}
	for _, g := range removed {
		fmt.Printf("reclaimed generation %d of %s (%s)\n", g.Number, g.Project, humanBytes(g.Used))
	}
	return nil
}

func cmdGoldenRemove(args []string) error {
	c := newCLI("golden rm")
	force := c.fs.Bool("force", false, "also remove every volume cloned from the golden (refused if any is mounted)")
	if err := c.parse(args, 1); err != nil {
		return err
	}
	// Checked here too: the server would refuse the name, but "." and ".." never reach it (the
	// HTTP router cleans them out of the path and answers a bare 404).
	if err := driver.ValidateProject(c.args[0]); err != nil {
		return err
	}
	var out map[string]string
	path := "/v1/goldens/" + url.PathEscape(c.args[0])
	if *force {
		path += "?force=true"
	}
	if err := c.call("DELETE", path, nil, &out); err != nil {
		return err
	}
	if c.json {
		return printJSON(out)
	}
	fmt.Println("removed golden", strconv.Quote(c.args[0]))
	return nil
}

func cmdVolumeReap(args []string) error {
	c := newCLI("volume reap")
	after := c.fs.String("after", "", "idle time after which a volume goes, such as 24h (default: the server's --reap-unused-after)")
	dryRun := c.fs.Bool("dry-run", false, "list what would be removed, and why, without removing it")
	if err := c.parse(args, 0); err != nil {
		return err
	}
	var out []reapDecision
	if err := c.call("POST", "/v1/reap", reapRequest{After: *after, DryRun: *dryRun}, &out); err != nil {
		return err
	}
	if c.json {
		return printJSON(out)
	}
	if len(out) == 0 {
		fmt.Println("nothing to reap: every volume was referenced recently")
	}
	for _, d := range out {
		switch {
		case *dryRun:
			fmt.Printf("would remove %s: %s\n", d.Volume, d.Reason)
		case d.Removed:
			fmt.Printf("removed %s: %s\n", d.Volume, d.Reason)
		default:
			fmt.Printf("kept %s: %s, but removing it failed: %s\n", d.Volume, d.Reason, d.Error)
		}
	}
	for _, d := range out {
		if d.Error != "" {
			return errors.New("some volumes could not be reaped (see above)")
		}
	}
	return nil
}

func cmdDoctor(args []string) error {
	c := newCLI("doctor")
	if err := c.parse(args, 0); err != nil {
		return err
	}
	var fs []driver.Finding
	if err := c.call("GET", "/v1/doctor", nil, &fs); err != nil {
		return err
	}
	problems := 0
	for _, f := range fs {
		if f.Level == driver.LevelProblem {
			problems++
		}
	}
	if c.json {
		if err := printJSON(fs); err != nil {
			return err
		}
	} else {
		tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
		for _, f := range fs {
			fmt.Fprintf(tw, "%s\t%s\t%s\n", strings.ToUpper(string(f.Level)), f.Check, f.Detail)
			if f.Action != "" {
				fmt.Fprintf(tw, "\t\t-> %s\n", f.Action)
			}
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	if problems > 0 {
		return fmt.Errorf("doctor: %d problem(s) need action", problems)
	}
	return nil
}
