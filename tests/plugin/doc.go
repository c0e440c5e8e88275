// Package plugin tests the ways users install zgolden, for real: the managed Docker plugin
// (docker plugin create from the assembled directory, install and upgrade from a local
// registry, disable and enable with volumes), the compose examples with Debian's docker-compose,
// and the host daemon's make install. On the host the plugin serves the reflink store; in the
// qemu guest (ZGOLDEN_TEST_ZPOOL) it serves ZFS.
package plugin
