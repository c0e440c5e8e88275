#!/usr/bin/env bash
# packaging/install.sh install|uninstall: zgolden as a host daemon (`make install`, `make uninstall`).
#
#   install    PREFIX/bin/zgolden (default /usr/local), the systemd unit zgolden.service in
#              /etc/systemd/system, and an example /etc/default/zgolden (an existing one is never
#              overwritten). With systemd running: daemon-reload and enable (not start).
#   uninstall  stops and disables the unit, removes the binary and the unit, and
#              /etc/default/zgolden only if it is still the unchanged example. Volumes, goldens,
#              /var/lib/zgolden and ZFS datasets are never touched.
#
# Environment: DESTDIR (stage into a directory; systemctl is then never run), PREFIX, BIN (the
# binary to install, default bin/zgolden from `make build`).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
say() { printf 'zgolden %s: %s\n' "$action" "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

action=${1:-}
case "$action" in install | uninstall) ;; *) echo "usage: $0 install|uninstall" >&2; exit 2 ;; esac
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr/local}
BIN=${BIN:-$repo/bin/zgolden}
bindir="$DESTDIR$PREFIX/bin"
unit="$DESTDIR/etc/systemd/system/zgolden.service"
defaults="$DESTDIR/etc/default/zgolden"

# systemd is the init only when /run/systemd/system exists (sd_booted); containers and minimal
# VMs have systemctl installed but no systemd to talk to.
use_systemd() { [ -z "$DESTDIR" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }
if [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
	die "run as root (sudo make $action), or stage with DESTDIR=..."
fi

if [ "$action" = install ]; then
	[ -x "$BIN" ] || die "no binary at $BIN: run make build first"
	install -D -m 0755 "$BIN" "$bindir/zgolden"
	# The unit names the binary by its installed path.
	mkdir -p "$(dirname "$unit")"
	sed "s|/usr/local/bin/zgolden|$PREFIX/bin/zgolden|g" "$here/zgolden.service" >"$unit.tmp"
	chmod 0644 "$unit.tmp"
	mv "$unit.tmp" "$unit"
	if [ -e "$defaults" ]; then
		say "kept the existing $defaults (the example is $here/zgolden.default)"
	else
		install -D -m 0644 "$here/zgolden.default" "$defaults"
	fi
	say "installed $bindir/zgolden, $unit, $defaults"
	if use_systemd; then
		systemctl daemon-reload
		systemctl enable zgolden.service
		say "enabled zgolden.service; edit $defaults, then: systemctl start zgolden"
	elif [ -z "$DESTDIR" ]; then
		say "systemd is not running here (PID 1 is $(ps -o comm= -p 1 2>/dev/null || echo unknown)): skipped systemctl daemon-reload and enable; start it yourself: $PREFIX/bin/zgolden serve (it reads the same ZGOLDEN_* variables as $defaults)"
	fi
	exit 0
fi

# uninstall
if use_systemd; then
	# Stopping leaves every mounted volume mounted for its container; only the server exits.
	systemctl disable --now zgolden.service 2>/dev/null || true
fi
rm -f "$bindir/zgolden" "$unit"
if [ -e "$defaults" ]; then
	if cmp -s "$defaults" "$here/zgolden.default"; then
		rm -f "$defaults"
	else
		say "kept $defaults: it holds your settings (delete it by hand if you no longer need it)"
	fi
fi
if use_systemd; then
	systemctl daemon-reload
fi
say "removed $bindir/zgolden and $unit; volumes, goldens and /var/lib/zgolden are untouched"
