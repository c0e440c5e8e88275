#!/usr/bin/env bash
# tests/setup/host-deps.sh installs what zgolden's tests need on a fresh Debian bookworm host:
# the real Docker engine, XFS and btrfs tools, Prometheus (which scrapes a running zgolden in
# tests/e2e), OpenSSH (tests/fleet runs its own sshd on 127.0.0.1), and what the qemu ZFS guests
# are built from (qemu, debootstrap). The zfs module is not built here: each guest builds its own, with DKMS,
# inside its own root (tests/vm/build-guest.sh), so the host stays a plain Debian 12.
# It is idempotent: a second run only checks.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

pkgs=(xfsprogs btrfs-progs e2fsprogs util-linux kmod rsync attr acl
	docker.io docker-compose docker-registry busybox-static
	qemu-system-x86 debootstrap cpio zstd git
	iproute2 ca-certificates jq procps openssh-client openssh-server
	gnuplot-nox prometheus)

missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ]; then
	apt-get update -qq
	echo "host-deps: installing ${missing[*]}"
	apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold "${missing[@]}"
fi
echo "host-deps: ok"
