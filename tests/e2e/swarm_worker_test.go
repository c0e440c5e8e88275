package e2e

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/zgolden/zgolden/tests/harness"
)

// TestSwarmWorkerPublishesThroughManager: on a swarm worker, node labels can only be written
// through a manager, so the plugin is given one (--swarm-manager, a manager engine over TCP with
// TLS from DOCKER_CERT_PATH). A second Docker engine on this machine is the manager, with the
// swarm's control port and a TLS API of its own; this machine's engine joins it as a worker and
// runs the plugin. The labels reach the worker's node through the manager, and a service created
// on the manager, constrained by them, runs on the worker with a volume cloned from the golden.
func TestSwarmWorkerPublishesThroughManager(t *testing.T) {
	if harness.InGuest() {
		// What it proves is the Docker API's path (a worker's labels written through a
		// manager), the same on either store; TestSwarmPlacementByGoldenLabels covers the ZFS
		// store's labels in the guest, where a second engine would cost minutes of emulation.
		t.Skip("runs on the host: the worker's path through a manager does not depend on the store")
	}
	requireNoSwarm(t)
	dockerd, err := exec.LookPath("dockerd")
	if err != nil {
		t.Skip("no dockerd to run the manager engine with")
	}
	mgr := startManagerEngine(t, dockerd)

	// The manager's swarm; this engine joins it as a worker, and the manager takes no tasks.
	swarmPort := freePort(t)
	mgr.docker(t, "swarm", "init", "--advertise-addr", "127.0.0.1:"+swarmPort, "--listen-addr", "127.0.0.1:"+swarmPort)
	mgr.docker(t, "node", "update", "--availability", "drain", mgr.docker(t, "info", "--format", "{{.Swarm.NodeID}}"))
	token := mgr.docker(t, "swarm", "join-token", "-q", "worker")
	harness.DockerCmd(t, "swarm", "join", "--token", token, "--advertise-addr", "127.0.0.1", "--listen-addr", "127.0.0.1:2377", "127.0.0.1:"+swarmPort)
	t.Cleanup(func() {
		if out, err := harness.Output("docker", "swarm", "leave", "--force"); err != nil {
			t.Errorf("cleanup: docker swarm leave: %v\n%s", err, out)
		}
	})
	worker := harness.DockerCmd(t, "info", "--format", "{{.Swarm.NodeID}}")
	if ctl := harness.DockerCmd(t, "info", "--format", "{{.Swarm.ControlAvailable}}"); ctl != "false" {
		t.Fatalf("this engine joined as a manager (control available: %s); the test is about a worker", ctl)
	}

	const prefix = "zgwork"
	// The TLS settings are the plugin's alone: the test's docker commands talk to this engine's
	// socket without TLS.
	b := startBackendEnv(t, []string{"DOCKER_CERT_PATH=" + mgr.certs, "DOCKER_TLS_VERIFY=1"},
		"--swarm-labels", prefix, "--swarm-manager", "tcp://127.0.0.1:"+mgr.apiPort)
	project := "wrk_" + b.id
	b.importGolden(t, project)
	backend := map[bool]string{true: "zfs", false: "reflink"}[b.pool != ""]
	want := map[string]string{
		prefix + ".backend":                      backend,
		prefix + ".golden." + project:            "true",
		prefix + ".newest." + project:            "1",
		prefix + ".generation." + project + ".1": "true",
	}
	// Only a manager can inspect nodes: the labels are read where the plugin wrote them.
	waitLabels(t, mgr.docker, worker, prefix, want)

	// A service created on the manager, placed by the labels, runs on the worker.
	vol, svc := b.n("zg-wsvc"), b.n("zg-wsvc")
	t.Cleanup(func() {
		_, _ = mgr.output("service", "rm", svc)
		waitGone(t, "label=com.docker.swarm.service.name="+svc)
		_, _ = harness.Output("docker", "volume", "rm", "-f", vol)
	})
	mgr.docker(t, placedService(svc, vol, b.p.Name, prefix+".golden."+project, project)...)
	ctr := waitTask(t, mgr.docker, svc)
	if node := mgr.docker(t, "inspect", "--format", "{{.NodeID}}", mgr.docker(t, "service", "ps", "-q", svc)); node != worker {
		t.Errorf("the task ran on node %s, want the worker %s", node, worker)
	}
	if got := harness.DockerCmd(t, "exec", ctr, "cat", "/data/README"); got != "golden content" {
		t.Fatalf("the worker's task reads %q from the golden's README", got)
	}
	if in := b.inspect(t, "zg-wsvc"); in.Status["golden"] != project {
		t.Fatalf("docker volume inspect of the task's volume = %+v", in)
	}
}

// managerEngine is a second dockerd on this machine: its own data, its own socket, a bridge of
// its own, and its API on 127.0.0.1 over TLS.
type managerEngine struct {
	sock, certs, apiPort string
}

func (m *managerEngine) output(args ...string) (string, error) {
	return harness.Output("docker", append([]string{"-H", "unix://" + m.sock}, args...)...)
}

func (m *managerEngine) docker(t *testing.T, args ...string) string {
	t.Helper()
	out, err := m.output(args...)
	if err != nil {
		t.Fatalf("docker %v on the manager engine: %v\n%s", args, err, out)
	}
	return strings.TrimSpace(out)
}

func startManagerEngine(t *testing.T, dockerd string) *managerEngine {
	t.Helper()
	// Short paths: containerd's sockets live under the exec root, and a unix socket's path has
	// a limit of 107 bytes.
	dir, err := os.MkdirTemp("", "zgmgr")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	m := &managerEngine{sock: filepath.Join(dir, "docker.sock"), certs: filepath.Join(dir, "certs"), apiPort: freePort(t)}
	writeTLS(t, m.certs)
	// Its own bridge: a dockerd given --bridge=none deletes docker0, which this machine's engine
	// uses.
	bridge := "zgmgr" + harness.ID()[:6]
	harness.Run(t, "ip", "link", "add", bridge, "type", "bridge")
	t.Cleanup(func() { _, _ = harness.Output("ip", "link", "del", bridge) })
	logf, err := os.Create(filepath.Join(dir, "dockerd.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(dockerd, "--data-root", filepath.Join(dir, "data"), "--exec-root", filepath.Join(dir, "exec"),
		"--pidfile", filepath.Join(dir, "dockerd.pid"), "-H", "unix://"+m.sock, "-H", "tcp://127.0.0.1:"+m.apiPort,
		"--tlsverify", "--tlscacert", filepath.Join(m.certs, "ca.pem"), "--tlscert", filepath.Join(m.certs, "server-cert.pem"),
		"--tlskey", filepath.Join(m.certs, "server-key.pem"), "--bridge", bridge, "--iptables=false", "--ip6tables=false")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(time.Minute):
			_ = cmd.Process.Kill()
			<-done
		}
		logf.Close()
		if t.Failed() {
			data, _ := os.ReadFile(logf.Name())
			t.Logf("manager engine's log:\n%s", data)
		}
	})
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(500 * time.Millisecond) {
		if _, err := m.output("info"); err == nil {
			break
		}
		select {
		case <-done:
			data, _ := os.ReadFile(logf.Name())
			t.Fatalf("the manager engine exited:\n%s", data)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("the manager engine did not answer within a minute")
		}
	}
	return m
}

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
}

// writeTLS makes a CA, a server certificate for 127.0.0.1 and a client certificate, under the
// names dockerd's flags and DOCKER_CERT_PATH expect.
func writeTLS(t *testing.T, dir string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	key := func(name string) *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		der, err := x509.MarshalECPrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		writePEM(t, filepath.Join(dir, name), "EC PRIVATE KEY", der)
		return k
	}
	now := time.Now()
	caKey := key("ca-key.pem")
	ca := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "zgolden test CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	writePEM(t, filepath.Join(dir, "ca.pem"), "CERTIFICATE", caDER)
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	for i, c := range []struct {
		cert, key string
		usage     x509.ExtKeyUsage
		ip        bool
	}{{"server-cert.pem", "server-key.pem", x509.ExtKeyUsageServerAuth, true}, {"cert.pem", "key.pem", x509.ExtKeyUsageClientAuth, false}} {
		k := key(c.key)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(int64(i + 2)), Subject: pkix.Name{CommonName: c.cert},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{c.usage}}
		if c.ip {
			tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &k.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		writePEM(t, filepath.Join(dir, c.cert), "CERTIFICATE", der)
	}
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}
