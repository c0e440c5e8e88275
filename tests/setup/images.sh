#!/usr/bin/env bash
# tests/setup/images.sh [CACHE_DIR]: builds the two rootfs tarballs zgolden's tests
# `docker import` (there is no image registry on these machines) and prints their paths:
#
#   busybox.tar  Debian's static busybox (/bin/busybox plus a symlink for every applet):
#                enough for `docker run IMG sh -c ...`.
#   dind.tar     debootstrap --variant=minbase bookworm + docker.io + iptables + git: a real
#                Docker-in-Docker image. Run it --privileged with a volume at /var/lib/docker
#                and a command, e.g. `dind-dockerd &` (see below). It also holds
#                /zgolden-images/busybox.tar so the inner engine can import a shell image.
#
# Networking choice for the inner engine: the image ships /usr/local/bin/dind-dockerd, which
# runs `dockerd --iptables=false --ip6tables=false --bridge=none "$@"`. An inner engine that
# touches no iptables rules starts the same way whatever the outer kernel's netfilter
# backend (nft or legacy, module loading or not), and no test here needs container
# networking: inner containers run with `--network none` (or host). iptables is still
# installed and switched to the legacy backend for tests that want plain `dockerd`.
#
# Cache: CACHE_DIR (default ${ZGOLDEN_CACHE:-/var/cache/zgolden-test}) / images-<key>/, where
# <key> hashes this script, tests/vm/lib.sh (the package lists live in these files), the
# Debian mirror and the host's busybox-static version. A warm run only prints the paths.
# Output: two lines, "busybox=<path>" and "dind=<path>"; progress goes to stderr.
set -euo pipefail

ZG_NAME=images
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../vm/lib.sh
. "$here/../vm/lib.sh"

[ "$(id -u)" = 0 ] || zg_die "must run as root (debootstrap, chroot)"
command -v debootstrap >/dev/null || zg_die "debootstrap missing: run tests/setup/host-deps.sh"
[ -x /bin/busybox ] && dpkg-query -W busybox-static >/dev/null 2>&1 ||
	zg_die "busybox-static missing: run tests/setup/host-deps.sh"

# The packages the dind image gets on top of minbase.
DIND_PKGS=(docker.io iptables git)

cache=$(zg_cache_dir "${1:-}")
bbver=$(dpkg-query -W -f='${Version}' busybox-static)
key=$( {
	cat "$here/images.sh" "$here/../vm/lib.sh"
	echo "mirror=$(zg_mirror) busybox=$bbver pkgs=${DIND_PKGS[*]}"
} | sha256sum | cut -c1-16)
out="$cache/images-$key"

print_paths() {
	echo "busybox=$out/busybox.tar"
	echo "dind=$out/dind.tar"
}

if [ -f "$out/done" ]; then
	print_paths
	exit 0
fi

exec 9>"$cache/images.lock"
flock 9
if [ -f "$out/done" ]; then # built by a concurrent run while we waited
	print_paths
	exit 0
fi

start=$SECONDS
export ZG_APT_ARCHIVES="$cache/apt-archives"
work=$(mktemp -d "$cache/images-build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- busybox.tar ----------------------------------------------------------------------
zg_log "building busybox.tar (busybox-static $bbver)"
bb="$work/busybox"
mkdir -p "$bb"/{bin,sbin,usr/bin,usr/sbin,etc,root,proc,sys,dev,run,var/tmp}
install -m 0755 /bin/busybox "$bb/bin/busybox"
for applet in $("$bb/bin/busybox" --list-full); do
	[ "$applet" = bin/busybox ] && continue
	mkdir -p "$bb/$(dirname "$applet")"
	ln -sf /bin/busybox "$bb/$applet"
done
install -d -m 1777 "$bb/tmp"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$bb/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$bb/etc/group"
[ -L "$bb/bin/sh" ] || zg_die "busybox has no sh applet"
tar --numeric-owner -C "$bb" -cf "$work/busybox.tar" .

# --- dind.tar -------------------------------------------------------------------------
zg_log "building dind.tar (minbase bookworm + ${DIND_PKGS[*]})"
d="$work/dind"
zg_debootstrap "$d"
zg_apt_install "$d" "${DIND_PKGS[@]}" >&2
zg_chroot "$d" update-alternatives --set iptables /usr/sbin/iptables-legacy >&2
zg_chroot "$d" update-alternatives --set ip6tables /usr/sbin/ip6tables-legacy >&2
cat >"$d/usr/local/bin/dind-dockerd" <<'EOF'
#!/bin/sh
# zgolden dind: a Docker engine that touches no iptables rules and makes no bridge,
# so it starts inside a privileged container on any kernel. Containers it runs
# use --network none (or host). Extra arguments go to dockerd.
exec /usr/sbin/dockerd --iptables=false --ip6tables=false --bridge=none "$@"
EOF
chmod 0755 "$d/usr/local/bin/dind-dockerd"
mkdir -p "$d/zgolden-images"
cp "$work/busybox.tar" "$d/zgolden-images/busybox.tar"
zg_slim "$d"
rm -rf "${d:?}/dev/"* # docker provides /dev; device nodes in a layer only get in the way
rm -f "$d/etc/hostname" "$d/etc/resolv.conf"
tar --numeric-owner -C "$d" -cf "$work/dind.tar" .

mkdir -p "$out"
mv "$work/busybox.tar" "$work/dind.tar" "$out/"
touch "$out/done"
# Drop the images of older keys: only the current inputs matter.
for old in "$cache"/images-*; do
	[ "$old" = "$out" ] || [ ! -f "$old/done" ] || rm -rf "$old"
done
zg_log "built in $((SECONDS - start)) s: $(du -sh "$out" | cut -f1)"
print_paths
