#!/usr/bin/env bash
# tests/vm/build-guest.sh [CACHE_DIR]: builds, once per set of inputs, the qemu guest that
# runs zgolden's real-ZFS tests for one ZFS release: a kernel (vmlinuz), its initrd, and an
# ext4 root disk image made with `mke2fs -d` (nothing is mounted on the host).
#
# ZGOLDEN_ZFS picks the release (default 2.4, the newest):
#   2.1  Debian 12 bookworm: kernel 6.1, zfs 2.1 from bookworm contrib, docker.io 20.10;
#   2.3  Debian 13 trixie:   kernel 6.12, zfs 2.3 from trixie contrib, docker.io 26;
#   2.4  Debian 13 trixie:   kernel 6.12, zfs 2.4 from trixie-backports contrib, docker.io 26.
#
# The zfs module is built by zfs-dkms inside the guest's own root (a chroot), against the
# guest's own kernel headers: the host stays a plain Debian 12 and never gets zfs-dkms. The
# userland comes from the same source package, so module and userland match by construction
# (checked below).
#
# On top of minbase go GUEST_PKGS, tests/vm/guest-init.sh as /sbin/zgolden-init, and both image
# tarballs of tests/setup/images.sh under /zgolden-images/; both are also preloaded in the
# guest engine as zgolden/busybox:latest and zgolden/dind:latest (importing dind.tar under TCG
# takes minutes). The 2.1 guest starts from dind.tar itself (minbase bookworm + docker.io).
#
# Versions are resolved from a private apt index of the release's suites, kept in the cache
# (the host's own apt sources are never changed). Cache: CACHE_DIR (default
# ${ZGOLDEN_CACHE:-/var/cache/zgolden-test}) / guest-<release>-<key>/, where <key> hashes the
# kernel, zfs and docker.io versions, the package list, this script, lib.sh, guest-init.sh and
# the images key. Building one release never drops another's guest.
# Output (stdout): release=, kver=, zfs=, docker=, kernel=, initrd=, root= lines; progress goes
# to stderr.
set -euo pipefail

ZG_NAME=build-guest
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"

GUEST_PKGS=(linux-image-KVER linux-headers-KVER zfs-dkms zfsutils-linux xfsprogs docker.io
	iptables udev initramfs-tools util-linux e2fsprogs kmod procps git iproute2 zstd
	btrfs-progs attr acl rsync openssh-client openssh-server) # the last line: the host's test tools (tests/fleet runs its own sshd)
ROOT_SIZE="${ZGOLDEN_VM_ROOT_SIZE:-8G}" # sparse; docker's data root in the guest lives here

[ "$(id -u)" = 0 ] || zg_die "must run as root"
command -v debootstrap >/dev/null || zg_die "debootstrap missing: run tests/setup/host-deps.sh"
cache=$(zg_cache_dir "${1:-}")

release="${ZGOLDEN_ZFS:-2.4}"
case "$release" in
2.1) suite=bookworm zfs_suite=bookworm ;;
2.3) suite=trixie zfs_suite=trixie ;;
2.4) suite=trixie zfs_suite=trixie-backports ;;
*) zg_die "ZGOLDEN_ZFS=$release: the test bed has 2.1, 2.3 and 2.4" ;;
esac

# --- versions, from a private index of the release's suites -----------------------------
index="$cache/apt-index-$suite"
idx_opts=(-o "Dir::Etc::SourceList=$index/sources.list" -o "Dir::Etc::SourceParts=$index/empty"
	-o "Dir::State::Lists=$index/lists" -o "Dir::Cache=$index/cache" -o Dir::State::status=/dev/null
	-o Debug::NoLocking=1)
mkdir -p "$index/lists/partial" "$index/cache" "$index/empty"
zg_sources_list "$suite" >"$index/sources.list"
# The same pin the guest gets, so that the candidates here are the versions it installs.
prefs="$index/preferences-$release"
zg_zfs_pin "$zfs_suite" >"$prefs"
idx_opts+=(-o "Dir::Etc::Preferences=$prefs" -o "Dir::Etc::PreferencesParts=$index/empty")
# At most one refresh an hour: a warm run should not wait on the mirror, and a guest built
# from hour-old lists is as valid as one built from fresh ones.
if [ -z "$(find "$index/lists" -maxdepth 1 -name '*Packages*' -mmin -60 -print -quit)" ]; then
	zg_log "refreshing the $suite index"
	apt-get "${idx_opts[@]}" update -qq >&2 ||
		[ -n "$(find "$index/lists" -maxdepth 1 -name '*Packages*' -print -quit)" ] ||
		zg_die "cannot read the $suite package index from $(zg_mirror)"
fi
idx() { apt-cache "${idx_opts[@]}" "$@"; }
kver=$(idx depends linux-image-amd64 2>/dev/null | sed -n 's/.*Depends: linux-image-\(.*-amd64\)$/\1/p' | head -n1)
[ -n "$kver" ] || zg_die "cannot resolve the $suite kernel from linux-image-amd64"
kdeb=$(idx policy "linux-image-$kver" | sed -n 's/^  Candidate: //p')
zfs_deb=$(idx policy zfs-dkms | sed -n 's/^  Candidate: //p')
[ -n "$zfs_deb" ] && [ "$zfs_deb" != "(none)" ] || zg_die "no zfs-dkms candidate in $suite contrib"
zver=${zfs_deb#*:}  # drop an epoch
zver=${zver%%-*}     # drop the Debian revision: 2.1.11-1+deb12u1 -> 2.1.11
case "$zver" in "$release".*) ;; *) zg_die "$zfs_suite has zfs-dkms $zfs_deb, not $release.x" ;; esac
docker_deb=$(idx policy docker.io | sed -n 's/^  Candidate: //p')

images=$(bash "$here/../setup/images.sh" "$cache")
busybox_tar=$(sed -n 's/^busybox=//p' <<<"$images")
dind_tar=$(sed -n 's/^dind=//p' <<<"$images")
[ -f "$busybox_tar" ] && [ -f "$dind_tar" ] || zg_die "images.sh did not produce the tarballs"

key=$( {
	cat "$here/build-guest.sh" "$here/lib.sh" "$here/guest-init.sh"
	echo "release=$release kernel=$kver/$kdeb zfs-dkms=$zfs_deb docker.io=$docker_deb"
	echo "images=$(dirname "$dind_tar") pkgs=${GUEST_PKGS[*]} root=$ROOT_SIZE mirror=$(zg_mirror)"
} | sha256sum | cut -c1-16)
out="$cache/guest-$release-$key"

print_paths() {
	echo "release=$release"
	echo "kver=$kver"
	echo "zfs=$zver"
	echo "docker=$docker_deb"
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

zg_log "zfs $release guest: $suite, kernel $kver, zfs-dkms $zfs_deb, docker.io $docker_deb"
if [ "$suite" = bookworm ]; then
	# dind.tar is minbase bookworm + docker.io already: start from it.
	tar --numeric-owner -C "$r" -xf "$dind_tar"
else
	zg_debootstrap "$r" "$suite"
fi
cp /etc/resolv.conf "$r/etc/resolv.conf" # only for apt during the build; removed below
rm -f "$r/etc/apt/sources.list" "$r/etc/apt/sources.list.d/debian.sources"
zg_sources_list "$suite" >"$r/etc/apt/sources.list.d/debian.list"
zg_zfs_pin "$zfs_suite" >"$r/etc/apt/preferences.d/zgolden-zfs"
zg_chroot "$r" apt-get update -q >&2
pkgs=("${GUEST_PKGS[@]/KVER/$kver}")
# From trixie on, the docker command is its own package (docker.io only recommends it).
[ "$suite" = bookworm ] || pkgs+=(docker-cli)
# zfs-dkms builds the module in its postinst, for every kernel whose headers are installed:
# here, only the guest's.
zg_log "installing ${pkgs[*]} (zfs-dkms builds the module now)"
zg_apt_install "$r" "${pkgs[@]}" >&2

moddir="$r/lib/modules/$kver/updates/dkms"
ls "$moddir"/zfs.ko* >/dev/null 2>&1 ||
	zg_die "zfs-dkms built no module for $kver ($(zg_chroot "$r" dkms status 2>&1 | tr '\n' ' '))"
# Module and userland come from one source package; a mismatch breaks in ways that look like
# data problems (docs/design-facts.md, "Userland against the module").
uver=$(zg_chroot "$r" dpkg-query -W -f='${Version}' zfsutils-linux)
dver=$(zg_chroot "$r" dpkg-query -W -f='${Version}' zfs-dkms)
[ "$uver" = "$dver" ] || zg_die "guest zfsutils-linux $uver does not match its zfs-dkms $dver"
[ "$dver" = "$zfs_deb" ] || zg_log "note: installed zfs-dkms $dver, the index said $zfs_deb"
dockerv=$(zg_chroot "$r" dpkg-query -W -f='${Version}' docker.io)

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
	# Its own network namespace: a dockerd given --bridge=none deletes the docker0 bridge it
	# finds, and in the namespace of the host that is the bridge of the host engine, whose
	# containers on the default network (the swarm tests on the host) then fail to start until
	# that engine is restarted. A cold CI run builds this guest while the host suites run.
	unshare --net -- dockerd --data-root /var/lib/docker --exec-root /tmp/zg-exec --pidfile /tmp/zg-dockerd.pid \
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
	echo "release=$release"
	echo "kver=$kver"
	echo "zfs_dkms=$dver"
	echo "zfsutils=$uver"
	echo "docker=$dockerv"
	echo "built=$(date -Is)"
} >"$out.tmp/info"
rm -rf "$out"
mv "$out.tmp" "$out"
touch "$out/done"
for old in "$cache/guest-$release"-*; do
	[ "$old" = "$out" ] || [ ! -f "$old/done" ] || rm -rf "$old"
done
zg_log "built in $((SECONDS - start)) s: $(du -sh "$out" | cut -f1) on disk"
print_paths
