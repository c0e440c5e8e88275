package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/zgolden/zgolden/driver"
)

// Push and pull move a golden between this host and another over SSH: the system ssh client,
// argv only, with host keys checked and never a prompt, and zgolden on the other host. Each
// sends what the receiver lacks: the sender's newest generation, incremental (ZFS) from the
// newest generation both hold with the same guid.

// sshTarget is the other host and how to reach it.
type sshTarget struct {
	host         string
	port         int
	identity     string
	knownHosts   string
	remoteBin    string
	remoteSocket string
}

// The remote command is a string the remote shell splits, whatever argv ssh is given, so every
// word that goes into it is held to characters no shell treats specially.
var (
	hostRE     = regexp.MustCompile(`^([A-Za-z0-9._-]+@)?[A-Za-z0-9][A-Za-z0-9._:-]*$`)
	safePathRE = regexp.MustCompile(`^[A-Za-z0-9_./-]+$`)
)

func (s *sshTarget) flags(fs *flag.FlagSet) {
	fs.IntVar(&s.port, "ssh-port", 0, "the other host's SSH port (default: ssh's)")
	fs.StringVar(&s.identity, "identity", "", "the private key ssh logs in with (default: ssh's)")
	fs.StringVar(&s.knownHosts, "known-hosts", "", "the known_hosts file that holds the other host's key (default: ssh's)")
	fs.StringVar(&s.remoteBin, "remote-zgolden", "zgolden", "the zgolden command on the other host")
	fs.StringVar(&s.remoteSocket, "remote-admin-socket", "", "the admin socket of zgolden serve on the other host (default: its default)")
}

func (s *sshTarget) check() error {
	if !hostRE.MatchString(s.host) {
		return fmt.Errorf("%w: host %q: give [USER@]HOST, with letters, digits, '.', '-', '_' and ':' only", driver.ErrInvalid, s.host)
	}
	for what, p := range map[string]string{"--remote-zgolden": s.remoteBin, "--remote-admin-socket": s.remoteSocket} {
		if p != "" && !safePathRE.MatchString(p) {
			return fmt.Errorf("%w: %s %q: letters, digits, '_', '.', '/' and '-' only", driver.ErrInvalid, what, p)
		}
	}
	return nil
}

// command is ssh running zgolden args on the other host.
func (s *sshTarget) command(ctx context.Context, args ...string) *exec.Cmd {
	argv := []string{"-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=20",
		"-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"}
	if s.port > 0 {
		argv = append(argv, "-p", strconv.Itoa(s.port))
	}
	if s.identity != "" {
		argv = append(argv, "-i", s.identity, "-o", "IdentitiesOnly=yes")
	}
	if s.knownHosts != "" {
		argv = append(argv, "-o", "UserKnownHostsFile="+s.knownHosts)
	}
	remote := append([]string{s.remoteBin}, args...)
	if s.remoteSocket != "" {
		remote = append(remote, "--admin-socket", s.remoteSocket)
	}
	argv = append(append(argv, "--", s.host), remote...)
	return exec.CommandContext(ctx, "ssh", argv...)
}

// sshError says what a failed ssh run means: exit status 255 is ssh's own failure (the host,
// the network, the keys), anything else the remote zgolden's. The last line of standard error
// is the one that says it (ssh prints a changed host key's warning banner before "Host key
// verification failed.").
func (s *sshTarget) sshError(err error, stderr string) error {
	lines := strings.Split(strings.TrimSpace(stderr), "\n")
	msg := strings.TrimSpace(lines[len(lines)-1])
	var exit *exec.ExitError
	if errors.As(err, &exit) && exit.ExitCode() == 255 {
		return fmt.Errorf("ssh to %s failed: %s (zgolden runs ssh with BatchMode=yes and StrictHostKeyChecking=yes: the host must be reachable, its key in known_hosts, and a key must log in without a prompt)", s.host, msg)
	}
	if msg == "" {
		msg = err.Error()
	}
	return fmt.Errorf("zgolden on %s: %s", s.host, strings.TrimPrefix(msg, "zgolden: "))
}

// remoteGoldens lists the other host's goldens.
func (s *sshTarget) remoteGoldens(ctx context.Context) ([]driver.Golden, error) {
	var out, stderr bytes.Buffer
	cmd := s.command(ctx, "golden", "ls", "--json")
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		return nil, s.sshError(err, stderr.String())
	}
	var gs []driver.Golden
	if err := json.Unmarshal(out.Bytes(), &gs); err != nil {
		return nil, fmt.Errorf("zgolden on %s answered golden ls with something else: %w", s.host, err)
	}
	return gs, nil
}

func generationsOf(gs []driver.Golden, project string) []driver.Generation {
	for _, g := range gs {
		if g.Project == project {
			return g.Generations
		}
	}
	return nil
}

// resumeToken is the token of the receiver's partial receive of project when it is of
// generation n, the one about to be sent ("" otherwise: the transfer replaces it).
func resumeToken(receiver []driver.Golden, project string, n int) (string, error) {
	for _, g := range receiver {
		if g.Project == project && g.Partial != nil && g.Partial.Generation == n {
			// It goes into the remote command line of a pull: held to a token's form.
			return g.Partial.Token, driver.ValidateResumeToken(g.Partial.Token)
		}
	}
	return "", nil
}

// planTransfer chooses what the sender sends the receiver of project: its newest generation,
// from the newest generation both hold with the same guid when incremental streams are possible
// (base 0: in full). upToDate is set when the receiver already holds the sender's newest.
func planTransfer(project string, sender, receiver []driver.Generation, incremental bool) (n, base int, upToDate bool, err error) {
	if len(sender) == 0 {
		return 0, 0, false, fmt.Errorf("%w: golden %q has no generation on the sending host", driver.ErrNotFound, project)
	}
	held := map[int]string{}
	for _, g := range receiver {
		held[g.Number] = g.GUID
	}
	newest := sender[len(sender)-1]
	if guid, ok := held[newest.Number]; ok && guid != "" && guid == newest.GUID {
		return newest.Number, 0, true, nil
	}
	if incremental {
		for i := len(sender) - 2; i >= 0; i-- {
			if guid := held[sender[i].Number]; guid != "" && guid == sender[i].GUID {
				return newest.Number, sender[i].Number, false, nil
			}
		}
	}
	return newest.Number, 0, false, nil
}

// backendName asks the local zgolden serve which store it runs: a transfer goes only between
// stores of one kind, and only ZFS sends incremental streams.
func (c *cli) backendName() (string, error) {
	var st struct {
		Backend string `json:"backend"`
	}
	if err := c.call("GET", "/v1/status", nil, &st); err != nil {
		return "", err
	}
	return st.Backend, nil
}

func transferCLI(name string) (*cli, *sshTarget) {
	c := newCLI(name)
	s := &sshTarget{}
	s.flags(c.fs)
	return c, s
}

func cmdGoldenPush(args []string) error {
	c, s := transferCLI("golden push")
	if err := c.parse(args, 2); err != nil {
		return err
	}
	project := c.args[0]
	s.host = c.args[1]
	if err := errors.Join(driver.ValidateProject(project), s.check()); err != nil {
		return err
	}
	ctx := context.Background()
	backend, err := c.backendName()
	if err != nil {
		return err
	}
	var local []driver.Golden
	if err := c.call("GET", "/v1/goldens", nil, &local); err != nil {
		return err
	}
	remote, err := s.remoteGoldens(ctx)
	if err != nil {
		return err
	}
	n, base, upToDate, err := planTransfer(project, generationsOf(local, project), generationsOf(remote, project), backend == "zfs")
	if err != nil {
		return err
	}
	if upToDate {
		return c.transferDone(project, n, base, 0, s.host, true, false)
	}
	token, err := resumeToken(remote, project, n)
	if err != nil {
		return fmt.Errorf("zgolden on %s: %w", s.host, err)
	}
	resp, err := c.do("GET", exportPath(project, n, base, token), nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		return decodeReply(resp, nil)
	}
	counted := &countingReader{r: resp.Body}
	var stderr bytes.Buffer
	cmd := s.command(ctx, "golden", "receive", project)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = counted, io.Discard, &stderr
	runErr := cmd.Run()
	if msg := resp.Trailer.Get(trailerError); msg != "" {
		return fmt.Errorf("golden push: the export failed after %d bytes: %s", counted.n, msg)
	}
	if runErr != nil {
		return s.sshError(runErr, stderr.String())
	}
	return c.transferDone(project, n, base, counted.n, s.host, false, counted.resumed())
}

func cmdGoldenPull(args []string) error {
	c, s := transferCLI("golden pull")
	if err := c.parse(args, 2); err != nil {
		return err
	}
	project := c.args[0]
	s.host = c.args[1]
	if err := errors.Join(driver.ValidateProject(project), s.check()); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	backend, err := c.backendName()
	if err != nil {
		return err
	}
	var local []driver.Golden
	if err := c.call("GET", "/v1/goldens", nil, &local); err != nil {
		return err
	}
	remote, err := s.remoteGoldens(ctx)
	if err != nil {
		return err
	}
	n, base, upToDate, err := planTransfer(project, generationsOf(remote, project), generationsOf(local, project), backend == "zfs")
	if err != nil {
		return err
	}
	if upToDate {
		return c.transferDone(project, n, base, 0, s.host, true, false)
	}
	token, err := resumeToken(local, project, n)
	if err != nil {
		return err
	}
	export := []string{"golden", "export", project, "--generation", strconv.Itoa(n), "--since", strconv.Itoa(base)}
	if token != "" {
		export = append(export, "--resume", token)
	}
	var stderr bytes.Buffer
	cmd := s.command(ctx, export...)
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("run ssh: %w", err)
	}
	counted := &countingReader{r: out}
	req, err := http.NewRequestWithContext(ctx, "POST", "http://zgolden/v1/goldens/"+project+"/receive", counted)
	if err != nil {
		return err
	}
	resp, recvErr := c.client().Do(req)
	var g driver.Generation
	if recvErr == nil {
		recvErr = decodeReply(resp, &g)
		resp.Body.Close()
	}
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	var sendErr error
	if recvErr == nil {
		sendErr = <-waited
	} else {
		// A sender that failed first explains the receiver's failure better (an export refused
		// before its first byte reads here as an empty stream); one still sending is stopped,
		// since nothing here reads the rest.
		select {
		case sendErr = <-waited:
		case <-time.After(2 * time.Second):
			cancel()
			<-waited
		}
	}
	if sendErr != nil && ctx.Err() == nil {
		return s.sshError(sendErr, stderr.String())
	}
	if recvErr != nil {
		return fmt.Errorf("golden pull: %w", recvErr)
	}
	return c.transferDone(project, g.Number, base, counted.n, s.host, false, counted.resumed())
}

func (c *cli) transferDone(project string, n, base int, bytes int64, host string, upToDate, resumed bool) error {
	if c.json {
		return printJSON(map[string]any{"project": project, "generation": n, "base": base, "bytes": bytes, "host": host, "up_to_date": upToDate, "resumed": resumed})
	}
	switch {
	case upToDate:
		fmt.Printf("golden %s generation %d is on both hosts already\n", project, n)
	case resumed:
		fmt.Printf("golden %s generation %d moved (resumed where the last transfer stopped): %s\n", project, n, humanBytes(uint64(bytes)))
	case base > 0:
		fmt.Printf("golden %s generation %d moved (since generation %d): %s\n", project, n, base, humanBytes(uint64(bytes)))
	default:
		fmt.Printf("golden %s generation %d moved in full: %s\n", project, n, humanBytes(uint64(bytes)))
	}
	return nil
}

// countingReader counts what passes through it, and keeps the stream's header line.
type countingReader struct {
	r    io.Reader
	n    int64
	head []byte
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	if len(c.head) < 64<<10 && !bytes.Contains(c.head, []byte("\n")) {
		c.head = append(c.head, p[:min(n, 64<<10-len(c.head))]...)
	}
	return n, err
}

// resumed reports whether the stream that passed was the rest of a partial receive (the sender
// decides: a token that no longer resumes is answered with the whole stream).
func (c *countingReader) resumed() bool {
	line, _, _ := bytes.Cut(c.head, []byte("\n"))
	h, _, err := driver.ReadStreamHeader(bytes.NewReader(append(line, '\n')))
	return err == nil && h.Resume
}
