#!/bin/bash
# tests/vm/guest-init.sh: PID 1 of zgolden's qemu test guest (installed as /sbin/zgolden-init
# by build-guest.sh, booted with init=/sbin/zgolden-init by run.sh).
#
# It mounts the kernel filesystems and cgroup2, starts udev (zvol links need it), loads zfs,
# creates pool zgt on the pool disk, mounts the payload disk at /payload, starts dockerd, runs
# every test binary listed in /payload/tests/manifest, writes results to /payload/results/,
# and reboots (qemu runs with -no-reboot, so that ends qemu; sysrq "o" hangs qemu here).
#
# Tests get ZGOLDEN_TEST_ZPOOL=zgt, ZGOLDEN_BIN=/payload/bin/zgolden, ZGOLDEN_IMAGES=/zgolden-images
# (busybox.tar, dind.tar), ZGOLDEN_IN_GUEST=1, and the tags of the same images already loaded in
# the guest's engine: ZGOLDEN_BUSYBOX_IMAGE=zgolden/busybox:latest, ZGOLDEN_DIND_IMAGE=zgolden/dind:latest.
#
# Disks (virtio, in this order, with serials so udev names them): zgroot (/, vda),
# zgpool (vdb), zgpayload (vdc). /payload/zgolden-vm.env (written by run.sh) may set
# TEST_TIMEOUT (go duration), TEST_RUN (a -test.run pattern) and EXTRA_ENV (lines K=V).
#
# Never `set -e` here: PID 1 exiting panics the kernel before results are written.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8
umask 022

RES=/payload/results
POOL=zgt
LOG=/run/zgolden-init.log

up() { cut -d' ' -f1 /proc/uptime 2>/dev/null || echo '?'; }
say() {
	local line
	line="zgolden-init [$(up)s] $*"
	echo "$line" >/dev/console
	echo "$line" >>"$LOG" 2>/dev/null
}

# finish reboots the guest after saving the log; qemu's -no-reboot turns that into an exit.
finish() {
	say "finishing: $*"
	if [ -n "${dockerd_pid:-}" ] && kill -0 "$dockerd_pid" 2>/dev/null; then
		kill -TERM "$dockerd_pid" 2>/dev/null
		for _ in $(seq 30); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 1; done
	fi
	if mountpoint -q /payload; then
		mkdir -p "$RES"
		cp "$LOG" "$RES/init.log" 2>/dev/null
		echo "$*" >"$RES/DONE"
		sync
		umount /payload 2>/dev/null || umount -l /payload
	fi
	sync
	echo "zgolden-init [$(up)s] poweroff" >/dev/console
	echo b >/proc/sysrq-trigger
	sleep 60 # not reached
}

setup_fail() {
	say "SETUP FAILED: $*"
	if mountpoint -q /payload; then
		mkdir -p "$RES"
		echo "$*" >>"$RES/SETUP_FAILED"
	fi
	finish "setup failed"
}

# --- kernel filesystems ---------------------------------------------------------------
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mountpoint -q /dev/pts || mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mountpoint -q /dev/shm || mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
mountpoint -q /run || mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
mkdir -p /run/lock
# /tmp stays on the root disk (as on the host), not tmpfs: the 6.1 kernel's tmpfs has no user.*
# xattrs (tests copy trees with them from t.TempDir), and tmpfs would eat the guest's RAM.
# The root image is attached with snapshot=on, so /tmp starts empty every boot.
mkdir -p /tmp
chmod 1777 /tmp
# Docker needs cgroups; bookworm's runc/containerd handle the unified hierarchy.
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
ln -sf /proc/self/fd /dev/fd 2>/dev/null
ln -sf /proc/self/fd/0 /dev/stdin 2>/dev/null
ln -sf /proc/self/fd/1 /dev/stdout 2>/dev/null
ln -sf /proc/self/fd/2 /dev/stderr 2>/dev/null
mount -o remount,rw / 2>/dev/null
hostname zgolden-guest
say "init started (kernel $(uname -r))"
echo "$(up)" >/run/zgolden-boot-to-init

ip link set lo up || say "warning: ip link set lo up failed"
# Nothing creates /dev/loop-control until the loop module is loaded (no systemd here to make
# static nodes), so load what the tests use up front.
for m in loop xfs btrfs overlay; do
	modprobe "$m" || say "warning: modprobe $m failed"
done

# --- udev -------------------------------------------------------------------------------
udevd=/lib/systemd/systemd-udevd
[ -x "$udevd" ] || udevd=/usr/lib/systemd/systemd-udevd
"$udevd" --daemon || say "warning: systemd-udevd did not start"
udevadm trigger --type=subsystems --action=add
udevadm trigger --type=devices --action=add
udevadm settle --timeout=60 || say "warning: udevadm settle timed out"

disk() { # disk SERIAL FALLBACK: the udev name of a virtio disk, or the fallback
	local p="/dev/disk/by-id/virtio-$1"
	if [ -e "$p" ]; then readlink -f "$p"; else echo "$2"; fi
}
payload_dev=$(disk zgpayload /dev/vdc)
pool_dev=$(disk zgpool /dev/vdb)

# --- payload ------------------------------------------------------------------------------
mkdir -p /payload
mount -t ext4 "$payload_dev" /payload || setup_fail "cannot mount the payload disk $payload_dev"
rm -rf "$RES"
mkdir -p "$RES"
cp /run/zgolden-boot-to-init "$RES/boot-to-init"
TEST_TIMEOUT=20m
TEST_RUN=""
EXTRA_ENV=""
if [ -f /payload/zgolden-vm.env ]; then
	# shellcheck disable=SC1091
	. /payload/zgolden-vm.env
fi
uname -r >"$RES/uname-r"

# --- zfs ------------------------------------------------------------------------------------
say "modprobe zfs"
modprobe zfs || setup_fail "modprobe zfs failed: $(dmesg | tail -n 5)"
cat /sys/module/zfs/version >"$RES/zfs-module-version" 2>&1
zfs version >"$RES/zfs-version" 2>&1
say "zfs module $(cat /sys/module/zfs/version 2>/dev/null); userland $(head -n1 "$RES/zfs-version")"
zpool create -f -o ashift=12 -O mountpoint=/"$POOL" "$POOL" "$pool_dev" >"$RES/zpool-create.out" 2>&1 ||
	setup_fail "zpool create $POOL $pool_dev failed: $(cat "$RES/zpool-create.out")"
zpool status "$POOL" >"$RES/zpool-status" 2>&1
say "pool $POOL on $pool_dev: $(zpool list -H -o health "$POOL")"

# --- docker -------------------------------------------------------------------------------
say "starting dockerd"
mkdir -p /var/lib/docker /etc/docker
dockerd --data-root /var/lib/docker >"$RES/dockerd.log" 2>&1 &
dockerd_pid=$!
ok=""
for _ in $(seq 120); do
	if docker info >/dev/null 2>&1; then ok=1; break; fi
	kill -0 "$dockerd_pid" 2>/dev/null || break
	sleep 1
done
[ -n "$ok" ] || setup_fail "dockerd not ready within 120 s: $(tail -n 5 "$RES/dockerd.log")"
docker info >"$RES/docker-info" 2>&1
docker info --format '{{.ServerVersion}}' >"$RES/docker-version" 2>&1
say "dockerd ready ($(docker info --format '{{.ServerVersion}} {{.Driver}}' 2>/dev/null))"

# --- tests ----------------------------------------------------------------------------------
envv=(PATH="$PATH" HOME=/root LANG=C.UTF-8 TMPDIR=/tmp
	ZGOLDEN_TEST_ZPOOL="$POOL" ZGOLDEN_BIN=/payload/bin/zgolden
	ZGOLDEN_IMAGES=/zgolden-images ZGOLDEN_IN_GUEST=1
	ZGOLDEN_BUSYBOX_IMAGE=zgolden/busybox:latest ZGOLDEN_DIND_IMAGE=zgolden/dind:latest)
while IFS= read -r kv; do
	[ -n "$kv" ] && envv+=("$kv")
done <<<"$EXTRA_ENV"
args=(-test.v -test.count=1 "-test.timeout=$TEST_TIMEOUT")
[ -n "$TEST_RUN" ] && args+=("-test.run=$TEST_RUN")

if [ ! -f /payload/tests/manifest ]; then
	say "no /payload/tests/manifest: nothing to run"
fi
# dump_stuck writes the kernel stacks of the tasks in uninterruptible sleep to $1: a binary that
# timed out on a hung pool leaves them, and the console's log level does not print the stacks of
# the kernel's own hung-task reports.
dump_stuck() {
	local p state
	for p in /proc/[0-9]*; do
		state=$(sed 's/.*) //' "$p/stat" 2>/dev/null | cut -d' ' -f1) || continue
		[ "$state" = D ] || continue
		{
			echo "== $(cat "$p/comm" 2>/dev/null) pid ${p#/proc/}"
			cat "$p/stack" 2>/dev/null
		} >>"$1"
	done
}

while IFS=$'\t' read -r name reldir; do
	[ -n "$name" ] || continue
	bin="/payload/tests/$name"
	dir="/payload/src/$reldir"
	[ -d "$dir" ] || dir=/payload
	say "RUN $name (in $dir)"
	t0=$(up)
	(cd "$dir" && exec env -i "${envv[@]}" "$bin" "${args[@]}" </dev/null 2>&1) |
		tee "$RES/$name.out" |
		grep --line-buffered -E '^(=== RUN|[[:space:]]*--- (PASS|FAIL|SKIP)|FAIL|ok|PASS|panic:)' |
		sed -u "s|^|  $name: |" >/dev/console
	rc=${PIPESTATUS[0]}
	echo "$rc" >"$RES/$name.rc"
	dump_stuck "$RES/$name.stuck"
	if [ -s "$RES/$name.stuck" ]; then
		say "$name: tasks stuck in the kernel after it ended:"
		head -n 120 "$RES/$name.stuck" | sed 's|^|  |' >/dev/console
	fi
	sync
	say "END $name rc=$rc ($(awk -v a="$t0" -v b="$(up)" 'BEGIN{printf "%.1f", b-a}') s)"
done </payload/tests/manifest

zpool status -D "$POOL" >"$RES/zpool-status-final" 2>&1
finish "ok"
