#!/usr/bin/env bash
# tests/setup/docker-engine.sh: make sure a real Docker engine answers on this host.
# If `docker info` already works, it does nothing. Otherwise it starts Debian's
# /usr/bin/dockerd (package docker.io, installed by tests/setup/host-deps.sh) in the
# background, logging to /var/log/zgolden-dockerd.log, and waits (bounded by
# ZGOLDEN_DOCKERD_WAIT seconds, default 60) until `docker info` works.
# Idempotent; exits non-zero with the log's tail when the engine does not come up.
# The first `docker` on PATH may be a newer client (/usr/local/bin/docker); it negotiates
# the API version down to the 20.10 engine, and this script prints both versions.
set -euo pipefail

log=/var/log/zgolden-dockerd.log
wait_s="${ZGOLDEN_DOCKERD_WAIT:-60}"

say() { printf 'docker-engine: %s\n' "$*" >&2; }

command -v docker >/dev/null || { say "no docker client: run tests/setup/host-deps.sh"; exit 1; }

versions() {
	docker version --format 'client {{.Client.Version}} (API {{.Client.APIVersion}}), engine {{.Server.Version}} (API {{.Server.APIVersion}})' 2>/dev/null || true
}

# The default network's bridge, which a dockerd given --bridge=none in the same network
# namespace deletes (an earlier build of a guest did, before tests/vm/build-guest.sh gave its
# dockerd a namespace of its own). The engine then starts no container on that network until
# it is restarted, and that is done here, only for an engine this script started.
bridge_gone() {
	local name
	name=$(docker network inspect bridge --format '{{index .Options "com.docker.network.bridge.name"}}' 2>/dev/null) || return 1
	[ -n "$name" ] && ! ip link show "$name" >/dev/null 2>&1
}

if docker info >/dev/null 2>&1; then
	if bridge_gone && grep -q "started by tests/setup/docker-engine.sh" "$log" 2>/dev/null; then
		say "the engine's default bridge is gone (deleted under it); restarting the engine this script started"
		# No lock here: an engine started by an older copy of this script holds it.
		pkill -TERM -x dockerd || true
		for _ in $(seq 60); do pgrep -x dockerd >/dev/null || break; sleep 1; done
		if pgrep -x dockerd >/dev/null; then
			say "dockerd did not stop within 60 s"
			exit 1
		fi
	else
		say "engine already running: $(versions)"
		exit 0
	fi
fi

dockerd=/usr/bin/dockerd
[ -x "$dockerd" ] || dockerd=/usr/sbin/dockerd
[ -x "$dockerd" ] || { say "no dockerd: run tests/setup/host-deps.sh"; exit 1; }

# Only one starter at a time; a second caller waits for the first one's engine.
exec 9>/run/zgolden-dockerd.lock
flock 9
if ! docker info >/dev/null 2>&1; then
	if [ -S /var/run/docker.sock ] && ! pgrep -x dockerd >/dev/null; then
		rm -f /var/run/docker.sock # stale socket from an engine that died
	fi
	if ! pgrep -x dockerd >/dev/null; then
		# A cgroup v2 hierarchy is required; mount it when a minimal init did not.
		if [ ! -e /sys/fs/cgroup/cgroup.controllers ] && ! mountpoint -q /sys/fs/cgroup; then
			mount -t cgroup2 none /sys/fs/cgroup || say "could not mount cgroup2 at /sys/fs/cgroup"
		fi
		say "starting $dockerd (log: $log)"
		{ echo "=== $(date -Is) started by tests/setup/docker-engine.sh"; } >>"$log"
		# 9>&-: the engine must not inherit the lock, or it holds it for its whole life.
		setsid "$dockerd" >>"$log" 2>&1 </dev/null 9>&- &
	fi
	deadline=$((SECONDS + wait_s))
	until docker info >/dev/null 2>&1; do
		if [ "$SECONDS" -ge "$deadline" ]; then
			say "dockerd did not answer within ${wait_s}s; last lines of $log:"
			tail -n 30 "$log" >&2 || true
			exit 1
		fi
		if ! pgrep -x dockerd >/dev/null; then
			say "dockerd exited; last lines of $log:"
			tail -n 30 "$log" >&2 || true
			exit 1
		fi
		sleep 1
	done
fi
say "engine ready: $(versions); storage driver $(docker info --format '{{.Driver}}' 2>/dev/null)"
