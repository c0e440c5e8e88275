#!/usr/bin/env bash
# tests/vm/build-guest.sh [CACHE_DIR]: builds, once per set of inputs, the qemu guest that
# runs zgolden's real-ZFS tests: a kernel (vmlinuz), its initrd, and an ext4 root disk
# image made with `mke2fs -d` (nothing is mounted on the host).
#
# The guest is the dind rootfs from tests/setup/images.sh (minbase bookworm + docker.io +
# iptables) plus GUEST_PKGS below, the DKMS-built zfs modules of the host (zfs-dkms built
# them for the guest kernel; the host kernel cannot load modules), tests/vm/guest-init.sh as
# /sbin/zgolden-init, and both image tarballs under /zgolden-images/; both are also preloaded
# in the guest engine as zgolden/busybox:latest and zgolden/dind:latest (importing dind.tar
# under TCG takes minutes).
#
# The guest kernel version is resolved from linux-image-amd64, as host-deps.sh does.
# Cache: CACHE_DIR (default ${ZGOLDEN_CACHE:-/var/cache/zgolden-test}) / guest-<key>/, where
# <key> hashes the kernel and zfs-dkms versions, the headers version, the package list,
# this script, lib.sh, guest-init.sh and the images key.
# Output (stdout): kver=, zfs=, kernel=, initrd=, root= lines; progress goes to stderr.
set -euo pipefail

ZG_NAME=build-guest
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"

GUEST_PKGS=(linux-image-KVER zfsutils-linux xfsprogs docker.io iptables udev initramfs-tools
	util-linux e2fsprogs kmod procps git iproute2 zstd
	btrfs-progs attr acl rsync) # the last line: the host's test tools, for tests of other backends
ROOT_SIZE="${ZGOLDEN_VM_ROOT_SIZE:-8G}" # sparse; docker's data root in the guest lives here

[ "$(id -u)" = 0 ] || zg_die "must run as root"
cache=$(zg_cache_dir "${1:-}")

kver=$(zg_guest_kver)
[ -n "$kver" ] || zg_die "cannot resolve the guest kernel from linux-image-amd64 (apt-get update? run tests/setup/host-deps.sh)"
dkms_deb=$(dpkg-query -W -f='${Version}' zfs-dkms 2>/dev/null || true)
[ -n "$dkms_deb" ] || zg_die "zfs-dkms is not installed: run tests/setup/host-deps.sh"
zver=${dkms_deb#*:}  # drop an epoch
zver=${zver%%-*}     # drop the Debian revision: 2.1.11-1+deb12u1 -> 2.1.11
hdrs=$(dpkg-query -W -f='${Version}' "linux-headers-$kver" 2>/dev/null || true)
[ -n "$hdrs" ] || zg_die "linux-headers-$kver is not installed: run tests/setup/host-deps.sh"
moddir="/var/lib/dkms/zfs/$zver/$kver/x86_64/module"

# --- wait for (or run) the DKMS build of zfs for the guest kernel ------------------------
dkms_busy() {
	pgrep -f 'tests/setup/host-deps.sh' >/dev/null ||
		pgrep -x dkms >/dev/null || pgrep -f '/usr/sbin/dkms' >/dev/null ||
		pgrep -x apt-get >/dev/null || pgrep -x dpkg >/dev/null
}
have_modules() { [ -f "$moddir/zfs.ko" ] || [ -f "$moddir/zfs.ko.xz" ] || [ -f "$moddir/zfs.ko.zst" ]; }
if ! have_modules; then
	deadline=$((SECONDS + ${ZGOLDEN_DKMS_WAIT:-2400}))
	while ! have_modules && dkms_busy; do
		[ "$SECONDS" -lt "$deadline" ] || zg_die "timed out waiting for the zfs DKMS build (dkms status: $(dkms status 2>&1 | tr '\n' ' '))"
		zg_log "waiting for the zfs DKMS build for $kver ($(dkms status zfs 2>&1 | tr '\n' ' '))"
		sleep 15
	done
	if ! have_modules; then
		zg_log "building zfs $zver for $kver with dkms"
		dkms build -m zfs -v "$zver" -k "$kver" >&2 || zg_die "dkms build failed"
	fi
	have_modules || zg_die "no zfs modules in $moddir after the DKMS build"
fi

images=$(bash "$here/../setup/images.sh" "$cache")
busybox_tar=$(sed -n 's/^busybox=//p' <<<"$images")
dind_tar=$(sed -n 's/^dind=//p' <<<"$images")
[ -f "$busybox_tar" ] && [ -f "$dind_tar" ] || zg_die "images.sh did not produce the tarballs"

key=$( {
	cat "$here/build-guest.sh" "$here/lib.sh" "$here/guest-init.sh"
	echo "kver=$kver zfs-dkms=$dkms_deb headers=$hdrs images=$(dirname "$dind_tar") pkgs=${GUEST_PKGS[*]} root=$ROOT_SIZE"
} | sha256sum | cut -c1-16)
out="$cache/guest-$key"

print_paths() {
	echo "kver=$kver"
	echo "zfs=$zver"
	echo "kernel=$out/vmlinuz"
	echo "initrd=$out/initrd.img"
	echo "root=$out/root.img"
}

if [ -f "$out/done" ]; then
	print_paths
	exit 0
fi
exec 9>"$cache/guest.lock"
flock 9
if [ -f "$out/done" ]; then
	print_paths
	exit 0
fi

start=$SECONDS
export ZG_APT_ARCHIVES="$cache/apt-archives"
work=$(mktemp -d "$cache/guest-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
r="$work/root"
mkdir -p "$r"

zg_log "guest kernel $kver, zfs $zver (zfs-dkms $dkms_deb), base $(basename "$(dirname "$dind_tar")")/dind.tar"
tar --numeric-owner -C "$r" -xf "$dind_tar"
cp /etc/resolv.conf "$r/etc/resolv.conf" # only for apt during the build; removed below
zg_chroot "$r" apt-get update -q >&2
pkgs=("${GUEST_PKGS[@]/KVER/$kver}")
zg_log "installing ${pkgs[*]}"
zg_apt_install "$r" "${pkgs[@]}" >&2

# The userland must match the kernel module (pitfall 11): same upstream version.
uver=$(zg_chroot "$r" dpkg-query -W -f='${Version}' zfsutils-linux)
uup=${uver#*:}
uup=${uup%%-*}
[ "$uup" = "$zver" ] || zg_die "guest zfsutils-linux $uver does not match the host's zfs-dkms $dkms_deb"
[ "$uver" = "$dkms_deb" ] || zg_log "note: zfsutils-linux $uver vs zfs-dkms $dkms_deb (same upstream $zver)"

zg_log "adding the DKMS zfs modules from $moddir"
mkdir -p "$r/lib/modules/$kver/updates/dkms"
cp "$moddir"/*.ko* "$r/lib/modules/$kver/updates/dkms/"
# The root is ext4 on a virtio disk. MODULES=most (the default) already covers it; the list
# makes it explicit. MODULES=dep would look at the build host's root, not the guest's.
printf 'virtio_pci\nvirtio_blk\next4\n' >"$r/etc/initramfs-tools/modules"
zg_chroot "$r" depmod -a "$kver" >&2
zg_chroot "$r" update-initramfs -u -k "$kver" >&2

# The guest's init, its identity, and the images the e2e tests `docker import`.
install -m 0755 "$here/guest-init.sh" "$r/sbin/zgolden-init"
echo zgolden-guest >"$r/etc/hostname"
printf '127.0.0.1\tlocalhost zgolden-guest\n::1\tlocalhost ip6-localhost\n' >"$r/etc/hosts"
rm -f "$r/etc/resolv.conf"
touch "$r/etc/resolv.conf" # the guest has no network; docker wants the file
mkdir -p "$r/zgolden-images" "$r/payload" "$r/var/lib/docker"
cp "$busybox_tar" "$dind_tar" "$r/zgolden-images/"

# Preload both images into the guest engine's data root. Under TCG, `docker import` of the
# 470 MB dind.tar takes well over 2 minutes in the guest (5 s here), so the guest boots with
# zgolden/busybox:latest and zgolden/dind:latest already present. The guest's own dockerd
# does the import, in the chroot, on a private socket, with no networking and no containers.
zg_log "preloading zgolden/busybox:latest and zgolden/dind:latest into the guest's /var/lib/docker"
zg_chroot "$r" /bin/bash -euc '
	sock=unix:///tmp/zg-build-docker.sock
	# dockerd refuses to start without cgroups ("Devices cgroup is not mounted"); cgroup2
	# mounts anywhere, even on a host with a v1 hierarchy, and only in this namespace.
	mount -t cgroup2 none /sys/fs/cgroup
	dockerd --data-root /var/lib/docker --exec-root /tmp/zg-exec --pidfile /tmp/zg-dockerd.pid \
		-H "$sock" --storage-driver overlay2 --bridge=none --iptables=false --ip6tables=false \
		>/tmp/zg-dockerd.log 2>&1 &
	pid=$!
	stop() {
		kill -TERM "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
		# dockerd stops the containerd it started; make sure, by its pid file.
		c=$(cat /tmp/zg-exec/containerd/containerd.pid 2>/dev/null || true)
		if [ -n "$c" ] && kill -0 "$c" 2>/dev/null; then kill -TERM "$c"; sleep 2; fi
	}
	trap stop EXIT
	for _ in $(seq 60); do docker -H "$sock" info >/dev/null 2>&1 && break; sleep 1; done
	docker -H "$sock" info >/dev/null 2>&1 || { tail -n 30 /tmp/zg-dockerd.log; exit 1; }
	docker -H "$sock" import /zgolden-images/busybox.tar zgolden/busybox:latest
	docker -H "$sock" import /zgolden-images/dind.tar zgolden/dind:latest
	docker -H "$sock" images
' >&2
printf 'zgolden/busybox:latest\tbusybox.tar\nzgolden/dind:latest\tdind.tar\n' >"$r/zgolden-images/preloaded"
zg_slim "$r"
# debootstrap's static /dev nodes are hidden by devtmpfs in the guest anyway.
rm -rf "${r:?}/dev/"*

rm -rf "$out.tmp"
mkdir -p "$out.tmp"
cp "$r/boot/vmlinuz-$kver" "$out.tmp/vmlinuz"
cp "$r/boot/initrd.img-$kver" "$out.tmp/initrd.img"
zg_log "making the ext4 root image ($ROOT_SIZE sparse)"
mke2fs -q -t ext4 -L zgroot -d "$r" "$out.tmp/root.img" "$ROOT_SIZE" >&2
{
	echo "kver=$kver"
	echo "zfs_dkms=$dkms_deb"
	echo "zfsutils=$uver"
	echo "built=$(date -Is)"
} >"$out.tmp/info"
rm -rf "$out"
mv "$out.tmp" "$out"
touch "$out/done"
for old in "$cache"/guest-*; do
	[ "$old" = "$out" ] || [ ! -f "$old/done" ] || rm -rf "$old"
done
zg_log "built in $((SECONDS - start)) s: $(du -sh "$out" | cut -f1) on disk"
print_paths
