// Package e2e drives zgolden only through the real docker command line and the zgolden admin
// command line: on the host against the reflink store, in the qemu guest against ZFS.
package e2e
