package crash

import (
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/zgolden/zgolden/driver/drivertest"
	"github.com/zgolden/zgolden/internal/fault"
	"github.com/zgolden/zgolden/tests/harness"
	"github.com/zgolden/zgolden/xfsutil"
	"github.com/zgolden/zgolden/zfsutil"
)

// baseProject is the golden every clone scenario clones; no scenario changes it.
const baseProject = "base"

// run is one scenario's state: what it made, for its checks and its cleanup.
type run struct {
	e          *env
	vol        string   // the volume the operation works on
	project    string   // the golden project the operation works on
	dir        string   // an import's source
	containers []string // docker containers to remove
	projects   []string // golden projects to remove
	n          int      // counter for container names
}

// scenario drives one operation that can reach a fault point.
type scenario struct {
	variant string
	// spares runs the scenario's plugin with --spares 1, a ready spare of the base golden made
	// before the fault is armed.
	spares bool
	// pause is a fault.PauseEnvVar setting for every plugin the scenario starts.
	pause string
	// prepare runs on the plugin before the fault is armed, so that it can use any operation.
	prepare func(t *testing.T, s *run)
	// act is the operation, with the fault armed. It runs in its own goroutine: it must not call
	// t's fatal methods, and it returns the command's output and error.
	act func(s *run) (string, error)
	// retry repeats the operation after the restart; it must succeed.
	retry func(t *testing.T, s *run) error
	// after checks what the retried operation produced.
	after func(t *testing.T, s *run)
}

func dockerRun(s *run, args ...string) (string, error) {
	s.n++
	name := s.e.name(fmt.Sprintf("c%s-%d", strings.ReplaceAll(s.vol, s.e.name(""), ""), s.n))
	s.containers = append(s.containers, name)
	return harness.Output("docker", append([]string{"run", "--rm", "--network", "none", "--name", name}, args...)...)
}

// prepareVolume creates the scenario's volume through Docker's API, for a preparation step.
func prepareVolume(t *testing.T, s *run, name string, opts map[string]string) {
	t.Helper()
	if err := s.e.dockerCreateAPI(name, opts); err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
}

func dockerCreate(s *run, opts ...string) (string, error) {
	args := []string{"volume", "create", "--driver", s.e.p.Name}
	for _, o := range opts {
		args = append(args, "-o", o)
	}
	return harness.Output("docker", append(args, s.vol)...)
}

// scenariosFor lists the operations that can reach point: each point is tried with every
// variant whose code path might reach it (a clone and a fresh volume for Create, each kind of
// promotion), and a variant that completes without reaching it counts as not reached.
func scenariosFor(point string) []scenario {
	op, _, _ := strings.Cut(point, ":")
	create := func(opts ...string) func(s *run) (string, error) {
		return func(s *run) (string, error) { return dockerCreate(s, opts...) }
	}
	retryCreate := func(opts ...string) func(t *testing.T, s *run) error {
		return func(t *testing.T, s *run) error {
			out, err := dockerCreate(s, opts...)
			if err != nil {
				return fmt.Errorf("%v: %s", err, out)
			}
			return nil
		}
	}
	promote := func(s *run) (string, error) {
		return s.e.admin("golden", "promote", s.vol, "--project", s.project)
	}
	retryPromote := func(t *testing.T, s *run) error {
		if out, err := promote(s); err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	}
	// The retried operation made a generation, and a clone of it holds the content.
	hasGeneration := func(t *testing.T, s *run) {
		for _, g := range s.e.goldens(t) {
			if newest := g.Newest(); g.Project == s.project && newest != nil {
				s.e.generationUsable(t, "after the retry", g.Project, newest.Number)
				return
			}
		}
		t.Errorf("after the retried operation, golden %q has no generation", s.project)
	}
	// untilSettled runs act and then waits for the background step the point sits in (a claim's
	// rename, a recorded removal's destroy) to be done, or for the plugin to die at the point.
	untilSettled := func(act func(s *run) (string, error), settled func(st status) bool) func(s *run) (string, error) {
		return func(s *run) (string, error) {
			out, err := act(s)
			for deadline := time.Now().Add(2 * time.Minute); err == nil && time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
				if st, serr := s.e.status(); serr != nil || settled(st) {
					break
				}
			}
			return out, err
		}
	}
	rm := func(s *run) (string, error) { return harness.Output("docker", "volume", "rm", s.vol) }
	removeScenario := func(act func(s *run) (string, error)) scenario {
		return scenario{
			variant: "docker-volume-rm",
			prepare: func(t *testing.T, s *run) {
				prepareVolume(t, s, s.vol, nil)
				s.e.writeMarker(t, s.vol, "promoted-never") // a volume that was used
			},
			act: act,
			retry: func(t *testing.T, s *run) error {
				// Docker forgets a volume once its driver no longer has it, so a retry of a
				// remove that completed is "no such volume"; what counts is that it is gone.
				if out, err := rm(s); err != nil && !strings.Contains(strings.ToLower(out), "no such volume") {
					return fmt.Errorf("%v: %s", err, out)
				}
				return nil
			},
			after: func(t *testing.T, s *run) {
				for _, v := range s.e.volumes(t) {
					if v.Name == s.vol {
						t.Errorf("the plugin still lists %s after docker volume rm succeeded", s.vol)
					}
				}
				if slices.Contains(s.e.dockerNames(t), s.vol) {
					t.Errorf("docker still lists %s after docker volume rm succeeded", s.vol)
				}
			},
		}
	}
	// removeRenaming removes a volume that is a claimed spare while its rename is under way: the
	// finisher pauses in it (claim:renaming) long enough for docker volume rm to come.
	removeRenaming := func(act func(s *run) (string, error)) scenario {
		sc := removeScenario(act)
		sc.variant, sc.spares, sc.pause = "spare-being-renamed", true, "claim:renaming=30s"
		sc.prepare = func(t *testing.T, s *run) {
			prepareVolume(t, s, s.vol, map[string]string{"golden": baseProject})
			s.e.writeMarker(t, s.vol, "promoted-never")
		}
		return sc
	}
	settledRemoval := func(st status) bool { return st.RemovedPending == 0 && st.ClaimsPending == 0 }
	// A fork of a volume that holds a marker: after the retry the fork holds it too.
	forkOf := func(s *run) string { return s.vol + "src" }
	fork := scenario{
		variant: "fork",
		prepare: func(t *testing.T, s *run) {
			prepareVolume(t, s, forkOf(s), map[string]string{"golden": baseProject})
			s.e.writeMarker(t, forkOf(s), "forked")
		},
		act:   func(s *run) (string, error) { return dockerCreate(s, "from="+forkOf(s)) },
		retry: func(t *testing.T, s *run) error { return retryCreate("from="+forkOf(s))(t, s) },
		after: func(t *testing.T, s *run) {
			s.e.expectDockerVolume(t, s.vol, baseProject)
			if got := s.e.readMarker(t, s.vol); got != "forked" {
				t.Errorf("the retried fork reads marker %q, want %q", got, "forked")
			}
		},
	}
	claimed := func(t *testing.T, s *run) { s.e.expectDockerVolume(t, s.vol, baseProject) }
	// Every container has exited: nothing may still hold the volume, and Docker must be able to
	// remove it (a reference left by the crash would pin it). A reference a crash inside Unmount
	// left is dropped once Docker says its container is gone, which the driver asks every 10 s
	// after a start (driver.go, "Mount references a crash inside Unmount left").
	exitedAndRemovable := func(t *testing.T, s *run) {
		var v volume
		var err error
		for deadline := time.Now().Add(time.Minute); ; time.Sleep(time.Second) {
			if v, err = s.e.get(s.vol); err != nil || v.mounts() == 0 || time.Now().After(deadline) {
				break
			}
		}
		if err != nil || v.mounts() != 0 {
			t.Errorf("a minute after the containers exited, %s is still held by %d mount(s) (%v)", s.vol, v.mounts(), err)
		}
		if out, err := harness.Output("docker", "volume", "rm", s.vol); err != nil {
			t.Errorf("docker volume rm after the containers exited: %v: %s", err, out)
		}
	}
	// waitedSpare: the Create finds no spare ready, because the one prepared was claimed, and
	// waits for the one the worker makes (held in spare:making, as a busy pool holds its clone).
	waitedSpare := scenario{
		variant: "spare-being-made", spares: true, pause: "spare:making=15s",
		prepare: func(t *testing.T, s *run) { prepareVolume(t, s, s.vol+"pre", map[string]string{"golden": baseProject}) },
		act: func(s *run) (string, error) {
			for deadline := time.Now().Add(time.Minute); ; time.Sleep(100 * time.Millisecond) {
				if st, err := s.e.status(); err == nil && st.SparesMaking > 0 && st.SparesReady[baseProject] == 0 {
					break
				}
				if time.Now().After(deadline) {
					return "", fmt.Errorf("no spare of %s was being made, with none ready, within a minute of the start", baseProject)
				}
			}
			return dockerCreate(s, "golden="+baseProject)
		},
		retry: retryCreate("golden=" + baseProject),
		after: claimed,
	}
	switch op {
	case "create":
		if point == "create:after-wait" {
			return []scenario{waitedSpare}
		}
		clone := scenario{variant: "clone", act: create("golden=" + baseProject), retry: retryCreate("golden=" + baseProject),
			after: func(t *testing.T, s *run) { s.e.expectDockerVolume(t, s.vol, baseProject) }}
		fresh := scenario{variant: "fresh", act: create(), retry: retryCreate(),
			after: func(t *testing.T, s *run) { s.e.expectDockerVolume(t, s.vol, "") }}
		spare := scenario{variant: "spare", spares: true, act: create("golden=" + baseProject), retry: retryCreate("golden=" + baseProject), after: claimed}
		// The variant that reaches the point comes first: in the guest only the first variant
		// that reaches it runs, and one that does not costs a restart and a Create (about 22 s).
		switch point {
		case "create:after-claim": // only a Create that finds a spare claims one
			return []scenario{spare, clone, fresh}
		case "create:after-format": // only a Create with no golden formats
			return []scenario{fresh, clone, spare}
		case "create:after-clone": // the reflink store's fork reflinks through the same step
			return []scenario{clone, fresh, spare, fork}
		}
		return []scenario{clone, fresh, spare}
	case "fork":
		return []scenario{fork}
	case "claim":
		// The claim's Create has returned; the spare is renamed to the volume's name after it.
		return []scenario{{
			variant: "spare", spares: true,
			act: untilSettled(create("golden="+baseProject), func(st status) bool { return st.ClaimsPending == 0 }),
			retry: func(t *testing.T, s *run) error {
				_, err := s.e.dockerInspect(s.vol)
				return err
			},
			after: claimed,
		}}
	case "spare":
		// The Create claims the ready spare; the worker makes its replacement after it, and the
		// crash falls in that making (reflinkstore/spares.go; on ZFS, after the bare clone,
		// whose project and generation the next start reads from its origin).
		return []scenario{{
			variant: "restock", spares: true,
			act: untilSettled(create("golden="+baseProject), func(st status) bool { return st.SparesReady[baseProject] >= 1 }),
			retry: func(t *testing.T, s *run) error {
				_, err := s.e.dockerInspect(s.vol)
				return err
			},
			after: claimed,
		}}
	case "settle":
		// Before 2.4 a Create of a golden clones its block volume bare and returns; the volume's
		// properties follow in the background (zfsstore/bare.go), and the crash falls after
		// they are stored. On 2.4 and on the reflink store nothing is bare: not reached.
		return []scenario{{
			variant: "clone",
			act:     untilSettled(create("golden="+baseProject), func(st status) bool { return st.SettlesPending == 0 }),
			retry: func(t *testing.T, s *run) error {
				_, err := s.e.dockerInspect(s.vol)
				return err
			},
			after: func(t *testing.T, s *run) { s.e.expectDockerVolume(t, s.vol, baseProject) },
		}}
	case "trash":
		// The Remove has returned; the worker destroys the dataset and deletes the record after
		// (ZFS), or the kept mount is unmounted and the image unlinked after (reflink). A
		// container uses the volume first, after the restart that armed the fault (which
		// unmounted the kept mounts), so that the removed volume has its kept mount.
		useThenRm := func(s *run) (string, error) {
			if out, err := dockerRun(s, "-v", s.vol+":/data", harness.BusyboxImage(), "true"); err != nil {
				return out, err
			}
			return rm(s)
		}
		return []scenario{removeScenario(untilSettled(useThenRm, func(st status) bool { return st.RemovedPending == 0 }))}
	case "mount":
		runIt := func(s *run) (string, error) {
			return dockerRun(s, "-v", s.vol+":/data", harness.BusyboxImage(), "sh", "-c", "echo mounted > /data/m && cat /data/m")
		}
		// The volume claims a spare that the worker mounted ahead (after the armed restart, as
		// a stop unmounts them), and its first Mount binds that mount.
		claimAndRun := func(s *run) (string, error) {
			for deadline := time.Now().Add(2 * time.Minute); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
				if st, err := s.e.status(); err == nil && st.SparesMounted > 0 {
					break
				}
			}
			if out, err := dockerCreate(s, "golden="+baseProject); err != nil {
				return out, err
			}
			return runIt(s)
		}
		earlyMounted := scenario{
			variant: "early-mounted-spare", spares: true, act: claimAndRun,
			retry: func(t *testing.T, s *run) error {
				if out, err := runIt(s); err != nil || strings.TrimSpace(out) != "mounted" {
					return fmt.Errorf("%v: %s", err, out)
				}
				return nil
			},
			after: claimed,
		}
		// A volume a container used before: its Unmount kept its XFS mounted (zfsstore's
		// premount.go, reflinkstore's kept.go), and the next Mount binds that mount. The
		// restart that arms the fault unmounts the kept mounts (a stop does), so the act runs
		// a container twice: the first run's Unmount keeps the XFS, the second's Mount binds it.
		keptMount := scenario{
			variant: "kept-mount",
			prepare: func(t *testing.T, s *run) {
				prepareVolume(t, s, s.vol, nil)
				s.e.writeMarker(t, s.vol, "promoted-kept")
			},
			act: func(s *run) (string, error) {
				if out, err := runIt(s); err != nil {
					return out, err
				}
				return runIt(s)
			},
			retry: func(t *testing.T, s *run) error {
				if out, err := runIt(s); err != nil || strings.TrimSpace(out) != "mounted" {
					return fmt.Errorf("%v: %s", err, out)
				}
				return nil
			},
			after: func(t *testing.T, s *run) {
				if got := strings.TrimSpace(s.e.readMarker(t, s.vol)); got != "promoted-kept" {
					t.Errorf("after the retry the volume's marker reads %q, want promoted-kept", got)
				}
				exitedAndRemovable(t, s)
			},
		}
		if point == "mount:after-bind" {
			return []scenario{earlyMounted, keptMount}
		}
		return []scenario{{
			variant: "docker-run",
			prepare: func(t *testing.T, s *run) { prepareVolume(t, s, s.vol, nil) },
			act:     runIt,
			retry: func(t *testing.T, s *run) error {
				if out, err := runIt(s); err != nil || strings.TrimSpace(out) != "mounted" {
					return fmt.Errorf("%v: %s", err, out)
				}
				return nil
			},
			after: exitedAndRemovable,
		}}
	case "unmount":
		// The container has exited and Docker unmounts: the crash falls between the bind that
		// keeps the XFS mounted (zfsstore/premount.go) and the unmount of Docker's mountpoint.
		write := func(s *run) (string, error) {
			return dockerRun(s, "-v", s.vol+":/data", harness.BusyboxImage(), "sh", "-c", "echo promoted-kept > /data/marker")
		}
		return []scenario{{
			variant: "docker-run",
			prepare: func(t *testing.T, s *run) { prepareVolume(t, s, s.vol, nil) },
			act:     write,
			retry: func(t *testing.T, s *run) error {
				if out, err := write(s); err != nil {
					return fmt.Errorf("%v: %s", err, out)
				}
				// The reference the crash left goes in the background, once Docker says its
				// container is gone (every 10 s after the start); the checks that follow
				// compare the references with the mount table, so they wait for that.
				for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(time.Second) {
					if v, err := s.e.get(s.vol); err == nil && v.mounts() == 0 {
						return nil
					}
				}
				return fmt.Errorf("a minute after the retry, %s still holds the reference the crash left", s.vol)
			},
			after: func(t *testing.T, s *run) {
				if got := strings.TrimSpace(s.e.readMarker(t, s.vol)); got != "promoted-kept" {
					t.Errorf("after the retry the volume's marker reads %q, want promoted-kept", got)
				}
				exitedAndRemovable(t, s)
			},
		}}
	case "remove":
		if point == "remove:after-handover-record" { // in the background, after docker volume rm returned
			return []scenario{removeRenaming(untilSettled(rm, settledRemoval))}
		}
		if point == "remove:during-rename" { // only a Remove of a claimed spare being renamed
			return []scenario{removeRenaming(rm), removeScenario(rm)}
		}
		return []scenario{removeScenario(rm), removeRenaming(rm)}
	case "promote":
		// The variants take each of the ZFS backend's promotion paths; the first is the common
		// one (a session cloned from the newest golden, promoted back into its project), which
		// is what ZGOLDEN_CRASH_VARIANTS=first keeps.
		return []scenario{
			{
				// A clone of the project's own golden: ZFS clones its snapshot and zfs-promotes
				// the clone into the root of the project's lineage.
				variant: "clone-of-own-golden",
				prepare: func(t *testing.T, s *run) {
					first := s.vol + "a"
					prepareVolume(t, s, first, nil)
					s.e.writeMarker(t, first, "promoted-first")
					if err := do(s.e.p.AdminSocket, "POST", "/v1/promote", map[string]string{"volume": first, "project": s.project}, nil); err != nil {
						t.Fatalf("promote %s: %v", first, err)
					}
					prepareVolume(t, s, s.vol, map[string]string{"golden": s.project})
					s.e.writeMarker(t, s.vol, "promoted-second")
				},
				act: promote, retry: retryPromote, after: hasGeneration,
			},
			{
				// A volume that is not a clone: ZFS clones its snapshot and zfs-promotes it.
				variant: "fresh-volume",
				prepare: func(t *testing.T, s *run) {
					prepareVolume(t, s, s.vol, nil)
					s.e.writeMarker(t, s.vol, "promoted-fresh")
				},
				act: promote, retry: retryPromote, after: hasGeneration,
			},
			{
				// A clone of another golden: ZFS copies it with a full send into a new lineage.
				variant: "other-golden",
				prepare: func(t *testing.T, s *run) {
					prepareVolume(t, s, s.vol, map[string]string{"golden": baseProject})
					s.e.writeMarker(t, s.vol, "promoted-other")
				},
				act: promote, retry: retryPromote, after: hasGeneration,
			},
		}
	case "export", "receive":
		// A golden of the scenario's own project, moved as a stream through a file: the
		// export's holds must be gone after the restart (the cleanup's golden rm fails on a
		// held snapshot), and a receive cut short must leave nothing a Create could clone.
		stream := func(s *run) string { return filepath.Join(s.dir, "stream") }
		imported := func(t *testing.T, s *run) {
			tree := filepath.Join(s.dir, "tree")
			makeSmallTree(t, tree)
			if out, err := s.e.admin("golden", "import", tree, "--project", s.project); err != nil {
				t.Fatalf("golden import: %v\n%s", err, out)
			}
		}
		export := func(s *run) (string, error) { return s.e.adminStream("", stream(s), "golden", "export", s.project) }
		receive := func(s *run) (string, error) { return s.e.adminStream(stream(s), "", "golden", "receive", s.project) }
		again := func(op func(s *run) (string, error)) func(t *testing.T, s *run) error {
			return func(t *testing.T, s *run) error {
				if out, err := op(s); err != nil {
					return fmt.Errorf("%v: %s", err, out)
				}
				return nil
			}
		}
		if op == "export" {
			return []scenario{{variant: "to-file", prepare: imported, act: export, retry: again(export),
				after: func(t *testing.T, s *run) { s.e.noHolds(t) }}}
		}
		return []scenario{{variant: "from-file",
			prepare: func(t *testing.T, s *run) {
				imported(t, s)
				if out, err := export(s); err != nil {
					t.Fatalf("golden export: %v\n%s", err, out)
				}
				if out, err := s.e.admin("golden", "rm", s.project); err != nil {
					t.Fatalf("golden rm: %v\n%s", err, out)
				}
			},
			act: receive,
			retry: func(t *testing.T, s *run) error {
				// Killed mid-stream, a ZFS receive keeps what arrived for a resume, and the
				// restart keeps it; the retry, a whole stream, replaces it.
				if point == "receive:mid-stream" && s.e.backend == "zfs" && s.e.partial(t, s.project) == nil {
					t.Errorf("after a kill mid-stream and the restart, golden %q keeps no partial receive", s.project)
				}
				return again(receive)(t, s)
			},
			after: func(t *testing.T, s *run) {
				hasGeneration(t, s)
				if p := s.e.partial(t, s.project); p != nil {
					t.Errorf("after the retry, golden %q still keeps the partial receive %+v", s.project, p)
				}
			}}}
	case "import":
		imp := func(s *run) (string, error) {
			return s.e.admin("golden", "import", s.dir, "--project", s.project)
		}
		return []scenario{{
			variant: "directory",
			prepare: func(t *testing.T, s *run) { makeSmallTree(t, s.dir) },
			act:     imp,
			retry: func(t *testing.T, s *run) error {
				if out, err := imp(s); err != nil {
					return fmt.Errorf("%v: %s", err, out)
				}
				return nil
			},
			after: hasGeneration,
		}}
	}
	return nil
}

// expectDockerVolume checks that Docker knows name as this plugin's volume, cloned from golden.
func (e *env) expectDockerVolume(t *testing.T, name, golden string) {
	t.Helper()
	v, err := e.dockerInspect(name)
	if err != nil {
		t.Error(err)
		return
	}
	if g, _ := v.Status["golden"].(string); v.Driver != e.p.Name || g != golden {
		t.Errorf("docker volume inspect %s: driver %q, golden %q; want %q, %q", name, v.Driver, g, e.p.Name, golden)
	}
}

// restart stops the plugin (it may already be dead) and starts it with the fault point armed,
// or with none when point is "".
func (e *env) restart(t *testing.T, point string) {
	t.Helper()
	e.p.Stop(syscall.SIGTERM)
	t.Setenv(fault.EnvVar, point)
	e.p.Start()
}

// actAndRecover runs the operation with point armed. If the plugin kills itself there, it is
// restarted at once without the fault, as a supervisor would, and the operation's command is
// let finish: Docker may retry its call against the restarted plugin. It returns whether the
// point was reached and the crashed plugin's log.
func (e *env) actAndRecover(t *testing.T, point string, act func() (string, error)) (reached bool, crashLog, out string, err error) {
	t.Helper()
	type result struct {
		out string
		err error
	}
	done := make(chan result, 1)
	go func() {
		o, err := act()
		done <- result{o, err}
	}()
	marker := "fault injection: SIGKILL at " + point
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(10 * time.Minute)
	for {
		select {
		case r := <-done:
			// The plugin may have killed itself at the point an instant ago, failing the command,
			// with its marker line still in the pipe: only its exit guarantees the log is whole.
			e.p.Stop(syscall.SIGKILL)
			logs := e.p.Logs()
			e.restart(t, "")
			return strings.Contains(logs, marker), logs, r.out, r.err
		case <-tick.C:
			if logs := e.p.Logs(); strings.Contains(logs, marker) {
				e.p.Stop(syscall.SIGKILL) // it is killing itself; wait until it is gone
				e.restart(t, "")
				r := <-done
				return true, logs, r.out, r.err
			}
		case <-deadline:
			t.Fatalf("the operation at %s neither finished nor crashed the plugin in 10 minutes", point)
		}
	}
}

// check asserts every invariant a crash must not break, for the plugin as it is now: the backend
// holds exactly what the plugin lists, mounts match the plugin's references, Docker lists what
// the plugin lists, and (when full) every listed volume and generation is complete and usable.
// Otherwise Docker's inspect of each volume must agree with the plugin's Get.
func (e *env) check(t *testing.T, phase string, s *run, full bool) {
	t.Helper()
	spares := e.settledSpares(t) // first: a claim still pending names its volume by the spare
	vols := e.volumes(t)
	gs := e.goldens(t)
	got, want := e.inventory(t), e.expected(t, vols, gs)
	want = append(want, e.forkSnapshots(t, got, vols)...)
	// The spare worker makes and retires spares at any moment (a restock after the restart): a
	// spare in the inventory is accounted for when the settled count before it or after it
	// names it. A slow guest (one vCPU) made one between the count and the inventory.
	spares = append(spares, e.settledSpares(t)...)
	if l := minus(minus(got, want), spares); len(l) > 0 {
		t.Errorf("%s: leaked (held by the backend, listed by nobody): %v", phase, l)
	}
	if l := minus(want, got); len(l) > 0 {
		t.Errorf("%s: listed by the plugin but missing from the backend: %v", phase, l)
	}
	var names, wantMounts []string
	for _, v := range vols {
		names = append(names, v.Name)
		if v.Mountpoint != "" {
			wantMounts = append(wantMounts, v.Mountpoint)
			if v.Mountpoint != filepath.Join(e.p.MountRoot, v.Name) {
				t.Errorf("%s: %s reports mountpoint %q", phase, v.Name, v.Mountpoint)
			}
		}
	}
	slices.Sort(names)
	slices.Sort(wantMounts)
	if gotMounts := mountsUnder(t, e.p.MountRoot); !slices.Equal(gotMounts, wantMounts) {
		t.Errorf("%s: mounts under the mount root %v, but the plugin's references say %v", phase, gotMounts, wantMounts)
	}
	// Under work/spares the worker mounts spares ahead of their claim, and a volume keeps one
	// such mount beside Docker's until it is destroyed (zfsstore/premount.go): each must be of a
	// dataset of the parent, and no dataset may have two (the second would hold its XFS after
	// the first went); anything else is an import's.
	// On the reflink store a volume's XFS is kept mounted at work/kept-INO from its Unmount
	// to its Remove (reflinkstore/kept.go): each must be of a listed volume's image, once.
	var imports []string
	early := map[string]string{}
	listed := map[string]bool{}
	for _, v := range vols {
		listed[filepath.Join(e.root, "store", "volumes", v.Name+".img")] = true
	}
	for _, m := range mountsUnder(t, filepath.Join(e.stateDir, "work")) {
		if e.backend == "reflink" && filepath.Dir(m) == filepath.Join(e.stateDir, "work") && strings.HasPrefix(filepath.Base(m), "kept-") {
			l, err := xfsutil.LoopAt(m)
			switch {
			case err != nil || l.BackingFile == "":
				t.Errorf("%s: the kept mount %s is on no loop device (%v)", phase, m, err)
			case strings.HasPrefix(l.BackingFile, filepath.Join(e.root, "store", "spares")+"/") && !l.Deleted:
				// a spare's, mounted ahead of its claim (reflinkstore/spares.go)
			case l.Deleted || !listed[l.BackingFile]:
				t.Errorf("%s: the kept mount %s is of %s, no listed volume's image", phase, m, l.BackingFile)
			case early[l.BackingFile] != "":
				t.Errorf("%s: %s has two kept mounts, %s and %s", phase, l.BackingFile, early[l.BackingFile], m)
			}
			early[l.BackingFile] = m
			continue
		}
		if filepath.Dir(m) != filepath.Join(e.stateDir, "work", "spares") {
			imports = append(imports, m)
			continue
		}
		me, err := xfsutil.MountedAt(m)
		if err != nil || me == nil {
			continue // unmounted since the listing
		}
		ds := zfsutil.ZvolName(me.Source)
		if ds == "" || !strings.HasPrefix(ds, e.parent+"/") {
			t.Errorf("%s: the early mount %s is of %q, no dataset of %s", phase, m, ds, e.parent)
		} else if other, dup := early[ds]; dup {
			t.Errorf("%s: %s has two early mounts, %s and %s", phase, ds, other, m)
		}
		early[ds] = m
	}
	if len(imports) > 0 {
		t.Errorf("%s: import mounts left in the work directory: %v", phase, imports)
	}
	if dn := e.dockerNames(t); !slices.Equal(dn, names) {
		t.Errorf("%s: docker volume ls says %v, the plugin lists %v", phase, dn, names)
	}
	if !full {
		for _, v := range vols {
			pv, err := e.get(v.Name)
			if err != nil {
				t.Errorf("%s: Get %s, which List shows: %v", phase, v.Name, err)
				continue
			}
			dv, err := e.dockerInspect(v.Name)
			if err != nil {
				t.Errorf("%s: %v", phase, err)
				continue
			}
			if m, _ := dv.Status["mounts"].(float64); dv.Driver != e.p.Name || int(m) != pv.mounts() || dv.Status["source"] != pv.Status["source"] {
				t.Errorf("%s: docker volume inspect %s = driver %q status %v; the plugin says %v", phase, v.Name, dv.Driver, dv.Status, pv.Status)
			}
		}
		return
	}
	if st, err := e.status(); err != nil || st.Volumes != len(vols) {
		t.Errorf("%s: zgolden status says %d volumes (%v); List shows %d", phase, st.Volumes, err, len(vols))
	}
	for _, v := range vols {
		e.usable(t, phase, v.Name)
	}
	for _, g := range gs {
		if g.Project == s.project {
			for _, gen := range g.Generations {
				e.generationUsable(t, phase, g.Project, gen.Number)
			}
		}
	}
}

// usable proves a listed volume is complete: it mounts, takes a write, and a clone of the base
// golden holds the golden's whole tree.
func (e *env) usable(t *testing.T, phase, name string) {
	t.Helper()
	v, err := e.get(name)
	if err != nil {
		t.Errorf("%s: Get %s, which List shows: %v", phase, name, err)
		return
	}
	id := "check-" + e.id
	mp, err := e.mount(name, id)
	if err != nil {
		t.Errorf("%s: %s is listed but does not mount: %v", phase, name, err)
		return
	}
	defer func() {
		if err := e.unmount(name, id); err != nil {
			t.Errorf("%s: unmount %s: %v", phase, name, err)
		}
	}()
	f := filepath.Join(mp, ".crash-check")
	if err := os.WriteFile(f, []byte(phase), 0o644); err != nil {
		t.Errorf("%s: %s mounts but takes no write: %v", phase, name, err)
		return
	}
	if got, err := os.ReadFile(f); err != nil || string(got) != phase {
		t.Errorf("%s: %s read back %q, %v", phase, name, got, err)
	}
	if v.str("golden") == baseProject && v.Status["generation"] != nil {
		drivertest.CheckTree(t, mp)
	}
}

// generationUsable clones one generation through the socket and checks its content.
func (e *env) generationUsable(t *testing.T, phase, project string, n int) {
	t.Helper()
	name := e.name(fmt.Sprintf("gen-%s-%d", project, n))
	opts := map[string]string{"golden": project, "generation": fmt.Sprint(n)}
	if err := call(e.p.Socket, "Create", map[string]any{"Name": name, "Opts": opts}, nil); err != nil {
		t.Errorf("%s: generation %d of %s is listed but does not clone: %v", phase, n, project, err)
		return
	}
	defer func() {
		if err := call(e.p.Socket, "Remove", map[string]string{"Name": name}, nil); err != nil {
			t.Errorf("%s: remove the clone of generation %d of %s: %v", phase, n, project, err)
		}
	}()
	mp, err := e.mount(name, "gen-check")
	if err != nil {
		t.Errorf("%s: a clone of generation %d of %s does not mount: %v", phase, n, project, err)
		return
	}
	check := checkMarker
	if strings.HasPrefix(project, "imp") {
		check = checkSmallTree
	}
	if err := check(mp); err != nil {
		t.Errorf("%s: generation %d of %s is incomplete: %v", phase, n, project, err)
	}
	if err := e.unmount(name, "gen-check"); err != nil {
		t.Errorf("%s: unmount the clone of generation %d of %s: %v", phase, n, project, err)
	}
}

// withSpares restarts the plugin with --spares 1 and waits for a ready spare of the base golden.
func (e *env) withSpares(t *testing.T) {
	t.Helper()
	e.p.Extra("--spares", "1")
	e.restart(t, "")
	for deadline := time.Now().Add(3 * time.Minute); ; time.Sleep(200 * time.Millisecond) {
		if st, err := e.status(); err == nil && st.SparesReady[baseProject] >= 1 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no spare of %s was made within 3 minutes", baseProject)
		}
	}
}

// withoutSpares restarts the plugin with the suite's --spares 0, and waits for its worker to
// retire the spares, so the backend holds what it held before the scenario.
func (e *env) withoutSpares(t *testing.T) {
	t.Helper()
	e.p.Extra()
	e.restart(t, "")
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(200 * time.Millisecond) {
		left := e.settledSpares(t)
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("after a restart without --spares, spares are left: %v", left)
			return
		}
	}
}

// cleanup removes what the scenario made (containers, volumes, goldens) and checks that the
// backend is back where it was before the scenario.
func (s *run) cleanup(t *testing.T, before []string) {
	e := s.e
	for _, c := range s.containers {
		_, _ = harness.Output("docker", "rm", "-f", c)
	}
	for _, name := range e.dockerNames(t) { // only names Docker knows: others cost a global lookup
		if err := do(dockerSocket, "DELETE", "/volumes/"+url.PathEscape(name), nil, nil); err != nil {
			t.Errorf("cleanup: docker volume rm %s: %v", name, err)
		}
	}
	for _, v := range e.volumes(t) {
		if err := call(e.p.Socket, "Remove", map[string]string{"Name": v.Name}, nil); err != nil {
			t.Errorf("cleanup: remove %s: %v", v.Name, err)
		}
	}
	for _, p := range s.projects {
		if err := do(e.p.AdminSocket, "DELETE", "/v1/goldens/"+p+"?force=true", nil, nil); err != nil && !strings.Contains(err.Error(), "does not exist") {
			t.Errorf("cleanup: zgolden golden rm %s: %v", p, err)
		}
	}
	if after := e.inventory(t); !slices.Equal(after, before) {
		t.Errorf("cleanup: the backend held %v before the scenario and %v after it", before, after)
	}
	if m := mountsUnder(t, e.p.MountRoot); len(m) > 0 {
		t.Errorf("cleanup: still mounted: %v", m)
	}
}

// selectedPoints is fault.Points, or the subset named (by prefix) in ZGOLDEN_CRASH_POINTS.
func selectedPoints() []string {
	sel := os.Getenv("ZGOLDEN_CRASH_POINTS")
	if sel == "" {
		return fault.Points
	}
	var out []string
	for _, p := range fault.Points {
		for _, s := range strings.Split(sel, ",") {
			if s = strings.TrimSpace(s); s != "" && strings.HasPrefix(p, s) {
				out = append(out, p)
				break
			}
		}
	}
	return out
}

// allVariants says whether every variant of a point runs (ZGOLDEN_CRASH_VARIANTS=all, the
// default on the host) or only variants until one reaches the point (=first, the default in the
// emulated guest, where one scenario takes the better part of a minute).
func allVariants() bool {
	switch os.Getenv("ZGOLDEN_CRASH_VARIANTS") {
	case "all":
		return true
	case "first":
		return false
	}
	return !harness.InGuest()
}

// phases times a scenario's steps, for the log: under emulation the budget is tight.
type phases struct {
	last  time.Time
	steps []string
}

func (p *phases) done(step string) {
	now := time.Now()
	p.steps = append(p.steps, fmt.Sprintf("%s %s", step, now.Sub(p.last).Round(100*time.Millisecond)))
	p.last = now
}

// TestCrashAtEveryFaultPoint kills the plugin (SIGKILL) at each fault point in turn, on this
// machine's backend, restarts it, and checks: nothing leaked, nothing half-made listed, every
// listed volume and generation usable, Docker and the plugin agree, the retried operation
// succeeds, and cleaning up leaves the backend as it was. It reports how many points survived.
func TestCrashAtEveryFaultPoint(t *testing.T) {
	e := startEnv(t)
	src := t.TempDir()
	drivertest.MakeTree(t, src)
	if out, err := e.admin("golden", "import", src, "--project", baseProject); err != nil {
		t.Fatalf("zgolden golden import: %v\n%s", err, out)
	}
	points := selectedPoints()
	var survived, notReached, failed []string
	k := 0
	for _, point := range points {
		reachedAny, allPassed := false, true
		for _, sc := range scenariosFor(point) {
			if reachedAny && !allVariants() {
				t.Logf("%s: variant %s not run (ZGOLDEN_CRASH_VARIANTS=first)", point, sc.variant)
				continue
			}
			k++
			var reached bool
			ok := t.Run(point+"/"+sc.variant, func(t *testing.T) {
				s := &run{e: e, vol: e.name(fmt.Sprintf("v%d", k)), project: fmt.Sprintf("p%d", k), dir: t.TempDir()}
				if strings.HasPrefix(point, "import") || strings.HasPrefix(point, "export") || strings.HasPrefix(point, "receive") {
					s.project = fmt.Sprintf("imp%d", k) // its golden holds the small tree (checkSmallTree)
				}
				s.projects = []string{s.project}
				ph := &phases{last: time.Now()}
				before := e.inventory(t)
				if sc.spares {
					if e.backend != "zfs" && sc.pause != "" {
						t.Logf("%s: its pause point (%s) is the ZFS store's; not run on the %s backend", point, sc.pause, e.backend)
						return
					}
					if sc.pause != "" {
						t.Setenv(fault.PauseEnvVar, sc.pause)
					}
					e.withSpares(t)
				}
				t.Cleanup(func() {
					if sc.spares {
						os.Unsetenv(fault.PauseEnvVar) // t.Setenv restores it after this cleanup
						e.withoutSpares(t)
					}
					s.cleanup(t, before)
					ph.done("cleanup")
					t.Logf("took: %s", strings.Join(ph.steps, ", "))
				})
				if sc.prepare != nil {
					sc.prepare(t, s)
				}
				ph.done("prepare")
				e.restart(t, point)
				ph.done("arm")
				var crashLog, out string
				var err error
				reached, crashLog, out, err = e.actAndRecover(t, point, func() (string, error) { return sc.act(s) })
				ph.done("act+restart")
				if !reached {
					if err != nil {
						t.Fatalf("the operation failed without reaching %s: %v\n%s", point, err, out)
					}
					t.Logf("%s: not reached by %s on the %s backend", point, sc.variant, e.backend)
					return
				}
				t.Logf("killed at %s; the interrupted command returned err=%v, %q", point, err, strings.TrimSpace(out))
				defer func() {
					if t.Failed() {
						t.Logf("log of the plugin that crashed:\n%s", crashLog)
						t.Logf("log of the restarted plugin:\n%s", e.p.Logs())
					}
				}()
				e.check(t, "after the restart", s, true)
				ph.done("check")
				if err := sc.retry(t, s); err != nil {
					t.Errorf("retrying the interrupted operation failed: %v", err)
				}
				ph.done("retry")
				e.check(t, "after the retry", s, false)
				if sc.after != nil {
					sc.after(t, s)
				}
				ph.done("check")
			})
			if reached {
				reachedAny = true
				allPassed = allPassed && ok
			} else if !ok {
				failed = append(failed, point+"/"+sc.variant+" (without a crash)")
			}
		}
		switch {
		case !reachedAny:
			notReached = append(notReached, point)
		case allPassed:
			survived = append(survived, point)
		default:
			failed = append(failed, point)
		}
	}
	t.Logf("%s backend: %d points survived out of %d tried (%d not reached on this backend: %v)",
		e.backend, len(survived), len(points), len(notReached), notReached)
	if len(failed) > 0 {
		t.Errorf("%s backend: fault points that broke an invariant: %v", e.backend, failed)
	}
}
