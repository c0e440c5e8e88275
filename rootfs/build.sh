#!/usr/bin/env bash
# rootfs/build.sh [CACHE_DIR]: builds, once per set of inputs, the root filesystem
# of zgolden's managed Docker plugin, and prints its path ("rootfs=<dir>") on stdout.
#
# What is in it: a debootstrap --variant=minbase bookworm plus only the tools zgolden runs:
#   util-linux, mount   mount, umount, losetup (volumes, loop devices of the reflink store)
#   xfsprogs            mkfs.xfs, xfs_freeze, xfs_growfs, xfs_db
#   coreutils           cp -a (golden imports)
#   zfsutils-linux      zfs, zpool, mount.zfs: Debian bookworm's OpenZFS 2.1 userland, which
#                       talks to the host's zfs kernel module through /dev/zfs. One userland, the
#                       oldest of the test bed: an older userland on a newer module is the
#                       direction that works, and the suites prove it on the 2.1, 2.3 and 2.4
#                       modules (config.json's ZGOLDEN_ZFS_PROVEN). On any other module the
#                       plugin refuses to start; such hosts run zgolden as a host daemon
#                       (README, "Installing"), which uses the host's own zfs tools.
# Docs, man pages, locales and apt's lists are stripped. The zgolden binary is NOT in the cached
# rootfs: `make plugin` copies bin/zgolden in when it assembles build/plugin/, so a rebuild of
# zgolden never re-runs debootstrap.
#
# Cache: CACHE_DIR (default ${ZGOLDEN_CACHE:-/var/cache/zgolden-test}) / plugin-rootfs-<key>/,
# where <key> hashes this script, tests/vm/lib.sh (debootstrap and apt helpers) and the Debian
# mirror. A warm run only prints the path. Progress goes to stderr. Needs root (debootstrap,
# chroot) and network access to the Debian mirror on a cold run.
set -euo pipefail

ZG_NAME=plugin-rootfs
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../tests/vm/lib.sh
. "$here/../tests/vm/lib.sh"

# The packages on top of minbase (util-linux, mount and coreutils are already in minbase).
PLUGIN_PKGS=(xfsprogs zfsutils-linux)

[ "$(id -u)" = 0 ] || zg_die "must run as root (debootstrap, chroot): sudo make plugin"
command -v debootstrap >/dev/null || zg_die "debootstrap is missing: apt-get install debootstrap (or run tests/setup/host-deps.sh)"

cache=$(zg_cache_dir "${1:-}")
key=$( {
	cat "$here/build.sh" "$here/../tests/vm/lib.sh"
	echo "mirror=$(zg_mirror) pkgs=${PLUGIN_PKGS[*]}"
} | sha256sum | cut -c1-16)
out="$cache/plugin-rootfs-$key"

if [ -f "$out/done" ]; then
	echo "rootfs=$out/rootfs"
	exit 0
fi

exec 9>"$cache/plugin-rootfs.lock"
flock 9
if [ -f "$out/done" ]; then # built by a concurrent run while we waited
	echo "rootfs=$out/rootfs"
	exit 0
fi

start=$SECONDS
export ZG_APT_ARCHIVES="$cache/apt-archives"
work=$(mktemp -d "$cache/plugin-rootfs-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
r="$work/rootfs"

zg_log "building the plugin rootfs (minbase bookworm + ${PLUGIN_PKGS[*]})"
zg_debootstrap "$r"
zg_apt_install "$r" "${PLUGIN_PKGS[@]}" >&2
# zfsutils-linux and xfsprogs depend on python3 (arcstat, xfs_scrub_all) and xfsprogs on libicu
# (xfs_scrub); zgolden runs neither, and together they are a third of the rootfs. Nothing ever
# runs apt in this rootfs (it is rebuilt, never upgraded), so the broken dependencies are moot.
# One at a time, dependents first: python3's prerm needs the interpreter the later ones remove.
for p in python3 python3-minimal python3.11 libpython3-stdlib libpython3.11-stdlib \
	python3.11-minimal libpython3.11-minimal libicu72; do
	zg_chroot "$r" dpkg --purge --force-depends "$p" >&2
done

zg_slim "$r"
# Beyond zg_slim: what a plugin that never runs apt or speaks another language does not need.
rm -rf "$r/usr/share/locale/"* "$r/usr/share/i18n" "$r/usr/share/lintian" "$r/usr/share/bash-completion" \
	"$r/usr/share/zsh" "$r/var/cache/apt/"*.bin "$r/var/cache/ldconfig/"* "$r/debootstrap"
find "$r" -xdev -name '__pycache__' -type d -prune -exec rm -rf {} +
# Docker gives the plugin its own /dev (and zgolden's config.json mounts the host's over it);
# device nodes in the rootfs only get in the way of `docker plugin create` and push.
rm -rf "${r:?}/dev/"*
# runc bind-mounts these; the plugin does not need the build host's copies.
rm -f "$r/etc/hostname" "$r/etc/resolv.conf" "$r/etc/hosts"
: >"$r/etc/hosts"
: >"$r/etc/resolv.conf"
mkdir -p "$r/run/docker/plugins" "$r/mnt/zgolden" "$r/var/lib/zgolden"

# Every tool zgolden runs must start (binary and shared libraries) after the slimming above:
# fail the build here rather than at a user's first volume.
for tool in mount umount losetup mkfs.xfs xfs_io xfs_freeze xfs_growfs xfs_db cp zfs zpool mount.zfs; do
	zg_chroot "$r" which "$tool" >/dev/null || zg_die "$tool is missing from the plugin rootfs"
done
for argv in "mount --version" "umount --version" "losetup --version" "mkfs.xfs -V" "xfs_io -V" \
	"xfs_growfs -V" "xfs_db -V" "cp --version"; do
	# shellcheck disable=SC2086 # word splitting of the fixed argv strings above is intended
	zg_chroot "$r" $argv >/dev/null || zg_die "'$argv' does not run in the plugin rootfs"
done
# zfs refuses every command without a zfs module (this build host has none), so check that the
# loader resolves its libraries instead, and record the userland version.
for bin in zfs zpool mount.zfs; do
	if zg_chroot "$r" sh -c 'ldd "$(which "$1")"' ldd "$bin" | grep -q 'not found'; then
		zg_die "$bin misses shared libraries in the plugin rootfs"
	fi
done
zg_log "zfs userland: $(zg_chroot "$r" dpkg-query -W -f='${Version}' zfsutils-linux)"

mkdir -p "$out"
mv "$r" "$out/rootfs"
touch "$out/done"
# Drop the rootfs of older keys: only the current inputs matter.
for old in "$cache"/plugin-rootfs-*; do
	[ "$old" = "$out" ] || [ ! -f "$old/done" ] || rm -rf "$old"
done
zg_log "built in $((SECONDS - start)) s: $(du -sh "$out/rootfs" | cut -f1)"
echo "rootfs=$out/rootfs"
