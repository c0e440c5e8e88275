#!/usr/bin/env bash
# tests/bench/run.sh: `make bench`. Runs the benchmark (tests/bench, TestBench) on the host's
# reflink backend and on real ZFS in the qemu guest, then merges both into
# tests/bench/results/latest.json, prints the table with the ratios and issue 9's goals, and
# draws tests/bench/results/create-latency.png.
#
# The machines are shared: before each part it waits (up to BENCH_WAIT seconds, default 3600)
# until no qemu guest is running, since a guest takes both cores of a 2-core host, and it prints
# the load average. The bench reports and never fails on speed; it fails if an operation errors.
#
# Environment:
#   BENCH_HOST=0 / BENCH_VM=0      skip the host or the guest part
#   ZGOLDEN_BENCH_*                the host part's settings (see tests/bench/bench_test.go)
#   ZGOLDEN_BENCH_VM_*             the guest part's, e.g. ZGOLDEN_BENCH_VM_SIZES=1000,10000
#                                  becomes ZGOLDEN_BENCH_SIZES inside the guest
#   BENCH_VM_TIMEOUT               bound on the guest run, seconds (default 2700)
#   BENCH_WAIT                     how long to wait for a free machine, seconds (default 3600)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
[ "$(id -u)" = 0 ] || { echo "bench: run as root (sudo make bench): it makes loop devices, mounts and a qemu guest" >&2; exit 1; }
logs=build/bench
mkdir -p "$logs" tests/bench/results

wait_quiet() { # wait_quiet WHAT: until no qemu guest runs (bounded), then show the load
	local waited=0 max=${BENCH_WAIT:-3600}
	while pgrep -x qemu-system-x86 >/dev/null; do # the process name, cut to 15 characters
		if [ "$waited" -ge "$max" ]; then
			echo "bench: WARNING: a qemu guest is still running after ${max}s; measuring $1 anyway (numbers will be noisy)" >&2
			break
		fi
		[ $((waited % 60)) = 0 ] && echo "bench: waiting for the running qemu guest to finish before measuring $1 ($(cut -d' ' -f1-3 /proc/loadavg))"
		sleep 10
		waited=$((waited + 10))
	done
	echo "bench: $1: load average $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) CPUs"
}

rc=0
sources=()
if [ "${BENCH_HOST:-1}" != 0 ]; then
	make --no-print-directory build
	wait_quiet "the host (reflink backend)"
	hrc=0
	ZGOLDEN_BENCH=1 ZGOLDEN_BIN="$repo/bin/zgolden" go test -count=1 -timeout 0 -v -run '^TestBench$' ./tests/bench 2>&1 |
		tee "$logs/host.log" | grep -v '^ZGBENCH-JSON ' || hrc=$?
	[ "$hrc" = 0 ] || { echo "bench: the host part failed (exit $hrc); see $logs/host.log" >&2; rc=1; }
	sources+=("$logs/host.log")
fi
if [ "${BENCH_VM:-1}" != 0 ]; then
	wait_quiet "the guest (ZFS backend)"
	extra="ZGOLDEN_BENCH=1"
	while IFS='=' read -r k v; do
		extra+=$'\n'"ZGOLDEN_BENCH_${k#ZGOLDEN_BENCH_VM_}=$v"
	done < <(env | grep '^ZGOLDEN_BENCH_VM_' || true)
	timeout_s=${BENCH_VM_TIMEOUT:-2700}
	vrc=0
	ZGOLDEN_VM_EXTRA_ENV="$extra" ZGOLDEN_VM_TEST_RUN='^TestBench$' ZGOLDEN_VM_POOL_SIZE=${ZGOLDEN_VM_POOL_SIZE:-32G} \
		ZGOLDEN_VM_TIMEOUT="$timeout_s" ZGOLDEN_VM_TEST_TIMEOUT="$((timeout_s / 60 - 3))m" ZGOLDEN_VM_QUIET=1 \
		bash tests/vm/run.sh ./tests/bench >"$logs/guest.log" 2>&1 || vrc=$?
	grep -v '^ZGBENCH-JSON ' "$logs/guest.log" | grep -E '^(test-vm|guest|FAIL|=== RUN|--- |    bench_test)|^\s+--- ' || true
	[ "$vrc" = 0 ] || { echo "bench: the guest part failed (exit $vrc); see $logs/guest.log" >&2; rc=1; }
	sources+=("$logs/guest.log")
fi
[ "${#sources[@]}" -gt 0 ] || { echo "bench: nothing to do (BENCH_HOST=0 and BENCH_VM=0)" >&2; exit 1; }
echo
go run ./tests/bench/report -json tests/bench/results/latest.json -png tests/bench/results/create-latency.png "${sources[@]}" || rc=1
exit "$rc"
