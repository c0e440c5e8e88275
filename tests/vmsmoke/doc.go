// Package vmsmoke proves the qemu test bed (tests/vm) gives real ZFS: it runs only in the guest (ZGOLDEN_TEST_ZPOOL set) and checks zvols, XFS clones and the duplicate-UUID pitfall for real.
package vmsmoke
