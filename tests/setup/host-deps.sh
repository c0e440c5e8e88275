#!/usr/bin/env bash
# tests/setup/host-deps.sh installs what zgolden's tests need on a fresh Debian bookworm host:
# the real Docker engine, XFS and btrfs tools, and what the qemu ZFS guest is built from.
# It is idempotent: a second run only checks.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

# zfs-dkms and zfsutils-linux live in Debian's contrib component.
add_contrib() {
	local f=/etc/apt/sources.list.d/debian.sources
	if [ -f "$f" ] && ! grep -Eq '^Components:.*contrib' "$f"; then
		sed -i -E 's/^(Components:.*main)$/\1 contrib/' "$f"
		echo "host-deps: added contrib to $f"
	fi
	if [ -f /etc/apt/sources.list ] && grep -Eq '^deb .*debian.* main$' /etc/apt/sources.list; then
		sed -i -E 's/^(deb .*debian.* main)$/\1 contrib/' /etc/apt/sources.list
	fi
}

# The guest runs Debian's distribution kernel; resolve its version from the
# linux-image-amd64 metapackage instead of hard-coding it.
guest_kernel() {
	apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/.*Depends: linux-image-\(.*-amd64\)$/\1/p' | head -n1
}

pkgs=(xfsprogs btrfs-progs e2fsprogs util-linux kmod rsync attr acl
	docker.io docker-compose docker-registry busybox-static
	qemu-system-x86 debootstrap dkms cpio zstd git
	iproute2 ca-certificates jq procps
	gnuplot-nox)

missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done

add_contrib
if [ "${#missing[@]}" -gt 0 ] || [ ! -f /var/lib/apt/lists/lock ] || [ -z "$(guest_kernel)" ]; then
	apt-get update -qq
fi
kver=$(guest_kernel)
[ -n "$kver" ] || { echo "host-deps: cannot resolve the linux-image-amd64 kernel version" >&2; exit 1; }
for p in "linux-headers-$kver" zfs-dkms; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
	echo "host-deps: installing ${missing[*]}"
	# --no-install-recommends keeps zfsutils-linux (and its services) off the host:
	# the host kernel has no zfs module, only the guest needs the userland.
	apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold "${missing[@]}"
fi
echo "host-deps: ok (guest kernel $kver)"
