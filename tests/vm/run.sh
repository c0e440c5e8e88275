#!/usr/bin/env bash
# tests/vm/run.sh [GO_PACKAGE...]: the host side of `make test-vm`. Runs Go test packages
# as root inside a qemu guest (TCG; KVM hangs on these machines) whose kernel has the real
# zfs module, and reports the results.
#
#   1. tests/setup/images.sh and tests/vm/build-guest.sh (both cached: a warm run only boots);
#   2. builds bin/zgolden from ./plugin (skipped with a warning while it does not exist) and
#      one test binary per package (default: every package with test files), CGO_ENABLED=0;
#   3. puts them, the repo's source tree (tests run from their package dir) and a manifest
#      on an ext4 payload disk, makes a fresh sparse pool disk, boots the guest under timeout;
#   4. reads /results back from the payload disk (debugfs, nothing mounted), prints each
#      binary's output and a summary. The last line is "guest: N passed, N failed, N skipped".
#
# Exit status is non-zero if a package failed to compile, a binary exited non-zero, any test
# failed, no test passed, the guest's setup failed, or the guest did not finish in time.
#
# Environment:
#   ZGOLDEN_CACHE            cache root (default /var/cache/zgolden-test)
#   ZGOLDEN_ZFS              the test bed's release: 2.1, 2.3 or 2.4 (default; build-guest.sh)
#   ZGOLDEN_VM_TIMEOUT       bound on the whole guest run, seconds (default 1500)
#   ZGOLDEN_VM_TEST_TIMEOUT  -test.timeout of each binary (default 20m)
#   ZGOLDEN_VM_TEST_RUN      -test.run pattern passed to every binary (default: all)
#   ZGOLDEN_VM_POOL_SIZE     sparse pool disk size (default 8G)
#   ZGOLDEN_VM_MEM, ZGOLDEN_VM_SMP   guest memory (MiB, default 4096) and CPUs (default 2)
#   ZGOLDEN_VM_SLOTS         how many guests may run at once on this machine (default 1)
#   ZGOLDEN_VM_EXTRA_ENV     newline-separated K=V lines added to the tests' environment
#   ZGOLDEN_VM_PAYLOAD       colon-separated host files copied to /payload/extra/ in the guest
#                            (the managed plugin's rootfs tarball: the guest cannot debootstrap)
#   ZGOLDEN_VM_QUIET=1       do not stream the guest console while it runs
#   ZGOLDEN_VM_KEEP=1        keep the work directory (printed) for debugging
#   ZGOLDEN_VM_RESULTS_OUT   copy what the guest wrote to /payload/results into this directory
#   ZGOLDEN_VM_PLUGIN=0      do not build bin/zgolden (e.g. to run only tests/vmsmoke)
set -euo pipefail

ZG_NAME=test-vm
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"

[ "$(id -u)" = 0 ] || zg_die "must run as root"
command -v qemu-system-x86_64 >/dev/null || zg_die "qemu-system-x86_64 missing: run tests/setup/host-deps.sh"
command -v debugfs >/dev/null || zg_die "debugfs (e2fsprogs) missing"

vm_timeout="${ZGOLDEN_VM_TIMEOUT:-1500}"
test_timeout="${ZGOLDEN_VM_TEST_TIMEOUT:-20m}"
cache=$(zg_cache_dir)
t_start=$SECONDS

# --- cached inputs ------------------------------------------------------------------------
zg_log "images and guest (cached in $cache)"
guest=$(bash "$here/build-guest.sh" "$cache")
gval() { sed -n "s/^$1=//p" <<<"$guest"; }
kernel=$(gval kernel)
initrd=$(gval initrd)
rootimg=$(gval root)
[ -f "$kernel" ] && [ -f "$initrd" ] && [ -f "$rootimg" ] || zg_die "build-guest.sh gave no guest"
t_cache=$SECONDS

work=$(mktemp -d "${TMPDIR:-/tmp}/zgolden-vm.XXXXXX")
qemu_pid=""
cleanup() {
	if [ -n "$qemu_pid" ]; then # interrupted while the guest runs: stop it (timeout passes it on)
		kill -TERM "$qemu_pid" 2>/dev/null || true
		wait "$qemu_pid" 2>/dev/null || true
	fi
	if [ "${ZGOLDEN_VM_KEEP:-}" = 1 ]; then
		zg_log "kept $work"
	else
		rm -rf "$work"
	fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
payload="$work/payload"
mkdir -p "$payload/bin" "$payload/tests" "$payload/src" "$payload/results"

# --- build the plugin and the test binaries ------------------------------------------------
cd "$repo"
export CGO_ENABLED=0
compile_failed=()
if [ "${ZGOLDEN_VM_PLUGIN:-1}" = 0 ]; then
	zg_log "ZGOLDEN_VM_PLUGIN=0: not building bin/zgolden"
elif [ -d plugin ] && go list ./plugin >/dev/null 2>&1; then
	zg_log "go build -o bin/zgolden ./plugin"
	# A plugin that does not build fails the run, but the tests still run and report.
	go build -o "$payload/bin/zgolden" ./plugin || compile_failed+=("./plugin (bin/zgolden)")
else
	zg_log "WARNING: ./plugin does not exist yet; the guest has no /payload/bin/zgolden"
fi

if [ "$#" -gt 0 ]; then
	pkgs=("$@")
else
	mapfile -t pkgs < <(go list -e -f '{{if or .TestGoFiles .XTestGoFiles}}{{.ImportPath}}{{end}}' ./... | sed '/^$/d')
fi
[ "${#pkgs[@]}" -gt 0 ] || zg_die "no Go packages with tests"
module=$(go list -m)
: >"$payload/tests/manifest"
while read -r ip dir; do
	[ -n "$ip" ] || continue
	rel=${dir#"$repo"}
	rel=${rel#/}
	name=$(tr '/' '_' <<<"${rel:-root}").test
	zg_log "go test -c $ip"
	if ! go test -c -o "$payload/tests/$name" "$ip"; then
		compile_failed+=("$ip")
		continue
	fi
	if [ ! -f "$payload/tests/$name" ]; then
		zg_log "WARNING: $ip has no test files; skipped"
		continue
	fi
	printf '%s\t%s\n' "$name" "$rel" >>"$payload/tests/manifest"
done < <(go list -e -f '{{.ImportPath}} {{.Dir}}' "${pkgs[@]}")
zg_log "module $module: $(wc -l <"$payload/tests/manifest") test binaries"

# The source tree (tracked and new files, not ignored ones), so tests run from their package
# dir and find their testdata; the guest also has git.
git ls-files -z --cached --others --exclude-standard |
	tar --null --no-recursion --ignore-failed-read -cf - -T - 2>/dev/null | tar -C "$payload/src" -xf - ||
	zg_log "WARNING: copying the source tree was incomplete"

if [ -n "${ZGOLDEN_VM_PAYLOAD:-}" ]; then
	mkdir -p "$payload/extra"
	IFS=: read -ra extra_files <<<"$ZGOLDEN_VM_PAYLOAD"
	for f in "${extra_files[@]}"; do
		[ -f "$f" ] || zg_die "ZGOLDEN_VM_PAYLOAD names $f, which is not a file"
		cp --reflink=auto "$f" "$payload/extra/"
	done
fi

{
	printf 'TEST_TIMEOUT=%q\n' "$test_timeout"
	printf 'TEST_RUN=%q\n' "${ZGOLDEN_VM_TEST_RUN:-}"
	printf 'EXTRA_ENV=%q\n' "${ZGOLDEN_VM_EXTRA_ENV:-}"
} >"$payload/zgolden-vm.env"

psize=$(( $(du -sm "$payload" | cut -f1) + 512 ))
mke2fs -q -t ext4 -L zgpayload -d "$payload" "$work/payload.img" "${psize}M"
truncate -s "${ZGOLDEN_VM_POOL_SIZE:-8G}" "$work/pool.img"
t_build=$SECONDS

# --- boot -----------------------------------------------------------------------------------
console="$work/console.log"
: >"$console"
# ZGOLDEN_VM_SLOTS guests at a time (default 1); later runs queue here instead of competing.
# A guest of 2 vCPUs keeps this machine's 2 cores about 63% busy and one of 1 vCPU about 52%,
# at 10% more time (measured on the crash suite): `make test` runs its two guests side by side
# with one vCPU each, and a manual run gets the machine alone.
slots=${ZGOLDEN_VM_SLOTS:-1}
exec 8>/dev/null
for ((i = 0; i < slots; i++)); do
	exec 8>"/run/zgolden-test-vm.lock${i#0}"
	flock -n 8 && break
	exec 8>/dev/null
done
if [ "$(readlink /proc/$$/fd/8)" = /dev/null ]; then
	zg_log "$slots guest(s) already running; waiting for one to finish"
	exec 8>/run/zgolden-test-vm.lock
	flock 8
fi
zg_log "booting the guest ($(basename "$kernel") $(gval kver), timeout ${vm_timeout}s)"
timeout -k 10 "$vm_timeout" qemu-system-x86_64 \
	-accel tcg,thread=multi -cpu max -smp "${ZGOLDEN_VM_SMP:-2}" -m "${ZGOLDEN_VM_MEM:-4096}" \
	-kernel "$kernel" -initrd "$initrd" \
	-append "root=/dev/vda rw console=ttyS0 init=/sbin/zgolden-init panic=1 loglevel=4 net.ifnames=0" \
	-drive "file=$rootimg,if=none,id=root,format=raw,snapshot=on,cache=unsafe" \
	-device virtio-blk-pci,drive=root,serial=zgroot \
	-drive "file=$work/pool.img,if=none,id=pool,format=raw,cache=unsafe" \
	-device virtio-blk-pci,drive=pool,serial=zgpool \
	-drive "file=$work/payload.img,if=none,id=payload,format=raw" \
	-device virtio-blk-pci,drive=payload,serial=zgpayload \
	-device virtio-rng-pci -nic none -vga none -display none -monitor none \
	-serial "file:$console" -no-reboot </dev/null &
qemu_pid=$!
if [ "${ZGOLDEN_VM_QUIET:-}" != 1 ]; then
	# Stream the console until qemu (or its timeout wrapper) is gone.
	# In the background so that a signal's trap runs at once (wait is interruptible).
	{ tail -n +1 -F --pid="$qemu_pid" "$console" 2>/dev/null | sed -u 's/\r$//; s/^/vm| /'; } &
	wait "$!" || true
fi
qrc=0
wait "$qemu_pid" || qrc=$?
qemu_pid=""
t_boot=$SECONDS

# --- results --------------------------------------------------------------------------------
res="$work/results"
# rdump creates $res itself
# A guest that was killed left its journal unreplayed; replay it so partial results show.
e2fsck -y -E journal_only "$work/payload.img" >/dev/null 2>&1 || true
debugfs -R "rdump /results $work" "$work/payload.img" >/dev/null 2>&1 || true
if [ -n "${ZGOLDEN_VM_RESULTS_OUT:-}" ]; then
	mkdir -p "$ZGOLDEN_VM_RESULTS_OUT" && cp -a "$res/." "$ZGOLDEN_VM_RESULTS_OUT/" || zg_log "WARNING: could not copy the results to $ZGOLDEN_VM_RESULTS_OUT"
fi

bad=()
[ "$qrc" = 0 ] || bad+=("qemu exited $qrc$([ "$qrc" = 124 ] && echo " (timed out after ${vm_timeout}s)")")
if [ ! -f "$res/DONE" ]; then
	bad+=("the guest did not finish (no results marker)")
	echo "=== last 40 console lines" >&2
	tr -d '\r' <"$console" | tail -n 40 >&2
fi
[ ! -f "$res/SETUP_FAILED" ] || bad+=("guest setup failed: $(cat "$res/SETUP_FAILED")")
for p in "${compile_failed[@]}"; do bad+=("$p did not compile"); done

tp=0 tf=0 ts=0
summary=()
while IFS=$'\t' read -r name _; do
	[ -n "$name" ] || continue
	out="$res/$name.out"
	echo
	echo "=================== $name"
	if [ -f "$out" ]; then cat "$out"; else echo "(no output)"; fi
	rc=$(cat "$res/$name.rc" 2>/dev/null || echo "none")
	p=$(grep -cE '^[[:space:]]*--- PASS' "$out" 2>/dev/null || true)
	f=$(grep -cE '^[[:space:]]*--- FAIL' "$out" 2>/dev/null || true)
	s=$(grep -cE '^[[:space:]]*--- SKIP' "$out" 2>/dev/null || true)
	tp=$((tp + ${p:-0})) tf=$((tf + ${f:-0})) ts=$((ts + ${s:-0}))
	summary+=("$(printf '%-40s exit=%-4s pass=%-3s fail=%-3s skip=%s' "$name" "$rc" "${p:-0}" "${f:-0}" "${s:-0}")")
	[ "$rc" = 0 ] || bad+=("$name exited $rc")
done <"$payload/tests/manifest"
[ "$tf" = 0 ] || bad+=("$tf tests failed")
[ "$tp" -gt 0 ] || bad+=("no test passed")

echo
echo "=================== summary"
echo "test bed release:  zfs $(gval release) (ZGOLDEN_ZFS; guest built with zfs-dkms $(gval zfs), docker.io $(gval docker))"
echo "guest kernel:      $(cat "$res/uname-r" 2>/dev/null || echo unknown)"
echo "zfs module:        $(cat "$res/zfs-module-version" 2>/dev/null || echo unknown)"
echo "zfs userland:      $(head -n1 "$res/zfs-version" 2>/dev/null || echo unknown)"
echo "docker engine:     $(cat "$res/docker-version" 2>/dev/null || echo unknown)"
echo "boot to init:      $(cat "$res/boot-to-init" 2>/dev/null || echo '?') s guest uptime"
echo "host time:         cache ${t_cache}s, build $((t_build - t_cache))s, guest $((t_boot - t_build))s, total $((SECONDS - t_start))s"
for l in "${summary[@]}"; do echo "$l"; done
if [ "${#bad[@]}" -gt 0 ]; then
	for b in "${bad[@]}"; do echo "FAIL: $b"; done
fi
echo "guest: $tp passed, $tf failed, $ts skipped"
[ "${#bad[@]}" = 0 ]
