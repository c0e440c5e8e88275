package main

import (
	"os"
	"strconv"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// The plugin's CPU priority (--nice, default -10).
//
// Docker waits on the plugin with deadlines, and on a busy host every session's build competes
// with it for CPU at the same default priority. At nice -10 the scheduler gives the plugin's
// threads about nine times a default thread's share, so a request waits less for a CPU; the
// plugin uses little CPU, in short bursts, so that costs the sessions almost nothing. The guest's
// bench could not show the gain through its noise: a request that does no work took 51 ms under
// load (median, one run) with the plugin at nice 0, and 5.4, 45, 15 and 26 ms in four runs at -10
// (tests/bench, the load case's probes). There most CPU under load goes to the kernel's ZFS
// threads, which run above -10 anyway; the case it is for is a host of user-space builds. The zfs
// commands the plugin starts inherit the value; their work is mostly in those kernel threads.
//
// Linux keeps a nice value per thread, and a new thread takes its creator's. So every thread
// the process has is set, until a pass finds no new one; the Go runtime makes later threads from
// these.

// setNice gives every thread of this process the nice value n. 0 leaves the priority alone. A
// refusal (no CAP_SYS_NICE) is logged and the plugin runs on at the priority it has.
func setNice(n int, log *logrus.Entry) {
	if n == 0 {
		return
	}
	done := map[int]bool{}
	for pass := 0; pass < 10; pass++ {
		tids, err := threads()
		if err != nil {
			log.WithError(err).Warn("cannot list this process's threads; running at the default priority")
			return
		}
		fresh := 0
		for _, tid := range tids {
			if done[tid] {
				continue
			}
			fresh++
			if err := unix.Setpriority(unix.PRIO_PROCESS, tid, n); err != nil && err != unix.ESRCH {
				log.WithError(err).WithField("nice", n).Warn("cannot raise the plugin's CPU priority (it needs CAP_SYS_NICE); requests may wait behind the sessions' work on a busy host")
				return
			}
			done[tid] = true
		}
		if fresh == 0 {
			log.WithFields(logrus.Fields{"nice": n, "threads": len(done)}).Debug("set the plugin's CPU priority")
			return
		}
	}
}

func threads() ([]int, error) {
	entries, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return nil, err
	}
	tids := make([]int, 0, len(entries))
	for _, e := range entries {
		if tid, err := strconv.Atoi(e.Name()); err == nil {
			tids = append(tids, tid)
		}
	}
	return tids, nil
}
