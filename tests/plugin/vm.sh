#!/usr/bin/env bash
# tests/plugin/vm.sh: run this package's tests in the qemu ZFS guest (TestManagedPluginZFS; the
# host tests skip there). The guest has no network to build the plugin's rootfs, so this builds
# it on the host (cached: tests/setup/plugin-rootfs.sh), writes it as a tarball, and has
# tests/vm/run.sh put it on the payload disk: the test assembles the plugin from it and the
# guest's /payload/bin/zgolden, exactly as make plugin does.
#
#   sudo bash tests/plugin/vm.sh          # extra arguments go to tests/vm/run.sh's environment
#
# Needs tests/vm/run.sh's ZGOLDEN_VM_PAYLOAD hook (host files copied to /payload/extra/).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
run=${ZGOLDEN_VM_RUN:-$repo/tests/vm/run.sh}
grep -q ZGOLDEN_VM_PAYLOAD "$run" ||
	{ echo "tests/plugin/vm.sh: $run has no ZGOLDEN_VM_PAYLOAD hook to carry the plugin rootfs into the guest" >&2; exit 1; }

cd "$repo"
make --no-print-directory build >&2
tar="$repo/build/plugin-rootfs.tar"
bash packaging/build-plugin.sh --out "$repo/build/plugin-vm" --tar "$tar"
export ZGOLDEN_VM_PAYLOAD="$tar"
export ZGOLDEN_VM_EXTRA_ENV="ZGOLDEN_PLUGIN_ROOTFS_TAR=/payload/extra/$(basename "$tar")${ZGOLDEN_VM_EXTRA_ENV:+
$ZGOLDEN_VM_EXTRA_ENV}"
exec bash "$run" ./tests/plugin
