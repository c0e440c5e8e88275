#!/usr/bin/env bash
# packaging/build-plugin.sh: assemble zgolden's managed Docker plugin directory and, optionally,
# create the plugin in the local Docker engine (`make plugin` runs it). No image registry needed.
#
#   packaging/build-plugin.sh [--rootfs DIR | --rootfs-tar FILE] [--bin FILE] [--out DIR]
#                             [--create NAME] [--tar FILE]
#
#   --rootfs DIR       the plugin's root filesystem without zgolden (default: the cached one that
#                      rootfs/build.sh builds or reuses)
#   --rootfs-tar FILE  the same, as a tarball (what --tar of a rootfs writes; for hosts that cannot
#                      debootstrap, such as the ZFS test guest)
#   --bin FILE         the static zgolden binary (default bin/zgolden, from `make build`)
#   --out DIR          where to assemble config.json and rootfs/ (default build/plugin)
#   --create NAME      then run `docker plugin create NAME DIR` (the plugin starts disabled)
#   --tar FILE         then write the assembled rootfs, without zgolden, as a tarball to FILE
#
# The assembled directory is exactly what `docker plugin create` takes: config.json (the
# repository's top-level one) and rootfs/ with zgolden at /usr/bin/zgolden.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
say() { printf 'build-plugin: %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

rootfs="" rootfs_tar="" bin="$repo/bin/zgolden" out="$repo/build/plugin" create="" tar_out=""
while [ "$#" -gt 0 ]; do
	case "$1" in
	--rootfs) rootfs=$2; shift 2 ;;
	--rootfs-tar) rootfs_tar=$2; shift 2 ;;
	--bin) bin=$2; shift 2 ;;
	--out) out=$2; shift 2 ;;
	--create) create=$2; shift 2 ;;
	--tar) tar_out=$2; shift 2 ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) die "unknown argument $1 (see --help)" ;;
	esac
done

[ "$(id -u)" = 0 ] || die "run as root (sudo make plugin): the rootfs holds root-owned and setuid files"
[ -x "$bin" ] || die "no zgolden binary at $bin: run make build first"
if file "$bin" 2>/dev/null | grep -q 'dynamically linked'; then
	die "$bin is dynamically linked; the plugin rootfs needs a static binary (make build sets CGO_ENABLED=0)"
fi

if [ -z "$rootfs" ] && [ -z "$rootfs_tar" ]; then
	rootfs=$(bash "$repo/rootfs/build.sh" | sed -n 's/^rootfs=//p')
	[ -d "$rootfs" ] || die "rootfs/build.sh did not give a rootfs"
fi

# Refuse to empty a directory that holds anything but what this script makes.
if [ -d "$out" ]; then
	for e in "$out"/* "$out"/.[!.]*; do
		[ -e "$e" ] || continue
		case "${e##*/}" in config.json | rootfs) ;; *) die "$out holds ${e##*/}, which this script did not make; choose another --out" ;; esac
	done
fi
rm -rf "$out"
mkdir -p "$out"
if [ -n "$rootfs_tar" ]; then
	mkdir "$out/rootfs"
	tar --numeric-owner -xpf "$rootfs_tar" -C "$out/rootfs"
else
	# --reflink=auto: near-free on XFS or btrfs, a plain copy elsewhere.
	cp -a --reflink=auto "$rootfs" "$out/rootfs"
fi
install -m 0755 "$bin" "$out/rootfs/usr/bin/zgolden"
install -m 0644 "$repo/config.json" "$out/config.json"
say "assembled $out ($(du -sh "$out/rootfs" | cut -f1), zgolden $("$bin" version 2>/dev/null | awk '{print $2}'))"

if [ -n "$tar_out" ]; then
	# The rootfs without zgolden: whoever unpacks it brings their own binary (--bin).
	tar --numeric-owner -C "$out/rootfs" --exclude=./usr/bin/zgolden -cf "$tar_out" .
	say "wrote $tar_out"
fi

if [ -n "$create" ]; then
	command -v docker >/dev/null || die "no docker command line: install docker.io"
	if docker plugin inspect "$create" >/dev/null 2>&1; then
		die "Docker already has a plugin named $create. Remove it first (docker plugin disable $create && docker plugin rm $create; volumes must be removed before), or choose another name: make plugin PLUGIN_NAME=zgolden:dev"
	fi
	docker plugin create "$create" "$out" >&2
	say "created plugin $create (disabled). Next: mkdir -p /var/lib/zgolden && docker plugin enable $create"
fi
