# tests/vm/lib.sh: helpers shared by tests/setup/images.sh and tests/vm/build-guest.sh.
# Source it; it defines functions only. Every cache key that depends on these helpers
# includes this file's hash, so editing it rebuilds what it built.

# zg_log prints a progress line on stderr with the calling script's name.
zg_log() { printf '%s: %s\n' "${ZG_NAME:-zgolden}" "$*" >&2; }
zg_die() { zg_log "ERROR: $*"; exit 1; }

# zg_cache_dir DIR: the cache root, outside the work tree.
zg_cache_dir() {
	local d="${1:-${ZGOLDEN_CACHE:-/var/cache/zgolden-test}}"
	mkdir -p "$d"
	(cd "$d" && pwd)
}

# zg_mirror: the Debian mirror, taken from the host's own apt sources (the one
# registry these machines reach), overridable with ZGOLDEN_DEBIAN_MIRROR.
zg_mirror() {
	if [ -n "${ZGOLDEN_DEBIAN_MIRROR:-}" ]; then
		echo "$ZGOLDEN_DEBIAN_MIRROR"
		return
	fi
	local m=""
	if [ -f /etc/apt/sources.list.d/debian.sources ]; then
		m=$(sed -n 's|^URIs:[[:space:]]*\(http[^[:space:]]*/debian\)/\{0,1\}$|\1|p' /etc/apt/sources.list.d/debian.sources | head -n1)
	fi
	if [ -z "$m" ] && [ -f /etc/apt/sources.list ]; then
		m=$(sed -n 's|^deb[[:space:]]\{1,\}\(http[^[:space:]]*/debian\)/\{0,1\}[[:space:]]\{1,\}bookworm[[:space:]].*|\1|p' /etc/apt/sources.list | head -n1)
	fi
	echo "${m:-http://deb.debian.org/debian}"
}

# zg_sha256 FILE...: one hash over the named files' contents.
zg_sha256() { cat "$@" | sha256sum | cut -c1-16; }

# zg_chroot ROOT CMD...: run CMD inside ROOT in a private mount namespace, with
# /proc, /sys, /dev and a persistent apt archive cache mounted. The mounts vanish
# with the namespace, so nothing is left mounted on the host even if we are killed.
zg_chroot() {
	local root="$1"
	shift
	local archives="${ZG_APT_ARCHIVES:-}"
	unshare -m --propagation private -- /bin/bash -euc '
		root="$1"; archives="$2"; shift 2
		# Make the root a mount point, as on a real system: the chrootarchive of dockerd (docker
		# import) remounts / with MS_SLAVE|MS_REC and gets EINVAL on a plain directory.
		# (No apostrophes in this single-quoted script.)
		mount --bind "$root" "$root"
		mount -t proc proc "$root/proc"
		mount -t sysfs sysfs "$root/sys"
		mount --bind /dev "$root/dev"
		mount -t devpts devpts "$root/dev/pts" -o newinstance,ptmxmode=0666 2>/dev/null || true
		mount -t tmpfs tmpfs "$root/tmp"
		if [ -n "$archives" ]; then
			mkdir -p "$archives/partial" "$root/var/cache/apt/archives"
			mount --bind "$archives" "$root/var/cache/apt/archives"
		fi
		exec chroot "$root" /usr/bin/env -i \
			PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
			HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"
	' zg_chroot "$root" "$archives" "$@"
}

# zg_apt_install ROOT PKG...: install packages in ROOT without recommends.
zg_apt_install() {
	local root="$1"
	shift
	zg_chroot "$root" apt-get install -y -q --no-install-recommends \
		-o Dpkg::Options::=--force-confold -o Dpkg::Use-Pty=0 "$@"
}

# zg_sources_list SUITE: one-line apt sources for a Debian suite, with its updates and security
# suites and the contrib component (zfs lives there); trixie also gets trixie-backports, where
# zfs 2.4 is. Backports are NotAutomatic: nothing comes from there unless pinned (zg_zfs_pin).
zg_sources_list() {
	local suite="$1" mirror sec
	mirror=$(zg_mirror)
	sec="${mirror%/debian}/debian-security"
	echo "deb $mirror $suite main contrib"
	echo "deb $mirror $suite-updates main contrib"
	echo "deb $sec $suite-security main contrib"
	[ "$suite" = bookworm ] || echo "deb $mirror $suite-backports main contrib"
}

# zg_zfs_pin SUITE: apt preferences that take every zfs package from SUITE. It matters only for
# a backports suite; for the release's own suite it says so and pins nothing.
zg_zfs_pin() {
	case "$1" in
	*-backports)
		cat <<EOF
Package: zfs-dkms zfsutils-linux zfs-zed zfs-initramfs libzfs* libzpool* libnvpair* libuutil* python3-pyzfs
Pin: release n=$1
Pin-Priority: 990
EOF
		;;
	*) echo "# zgolden: zfs comes from $1 itself; nothing to pin" ;;
	esac
}

# zg_debootstrap ROOT [SUITE]: a minbase SUITE (default bookworm) in ROOT with the sources of
# zg_sources_list and a policy-rc.d that keeps every service from starting.
zg_debootstrap() {
	local root="$1" suite="${2:-bookworm}" mirror
	mirror=$(zg_mirror)
	mkdir -p "${ZG_APT_ARCHIVES:?}"
	zg_log "debootstrap minbase $suite from $mirror"
	debootstrap --variant=minbase --cache-dir="$ZG_APT_ARCHIVES" "$suite" "$root" "$mirror" >&2 ||
		zg_die "debootstrap failed (see $root/debootstrap/debootstrap.log)"
	rm -f "$root/etc/apt/sources.list" "$root/etc/apt/sources.list.d/debian.sources"
	zg_sources_list "$suite" >"$root/etc/apt/sources.list.d/debian.list"
	printf '#!/bin/sh\n# zgolden: never start services while building an image.\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
	chmod 0755 "$root/usr/sbin/policy-rc.d"
	zg_chroot "$root" apt-get update -q >&2
	zg_chroot "$root" apt-get -y -q -o Dpkg::Options::=--force-confold -o Dpkg::Use-Pty=0 dist-upgrade >&2
}

# zg_slim ROOT: drop apt lists, docs and logs an image never reads.
zg_slim() {
	local root="$1"
	rm -rf "$root/var/lib/apt/lists/"* "$root/usr/share/doc/"* "$root/usr/share/man/"* \
		"$root/usr/share/info/"* "$root/var/log/"*.log "$root/var/cache/debconf/"*-old
	mkdir -p "$root/var/lib/apt/lists/partial"
}
