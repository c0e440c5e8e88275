#!/usr/bin/env bash
# tests/setup/run-deps.sh: what `make run` needs on a fresh Debian machine to run the plugin:
# XFS tools, util-linux (mount, losetup), and a Docker engine for the plugin to serve.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
command -v go >/dev/null || { echo "run-deps: Go is not installed; install Go 1.24 or newer (https://go.dev/dl/) and retry" >&2; exit 1; }
need=()
for p in xfsprogs util-linux mount docker.io; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
	echo "run-deps: installing ${need[*]}"
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bash "$here/docker-engine.sh"
