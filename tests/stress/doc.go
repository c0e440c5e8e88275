// Package stress races thousands of random volume and golden operations from many goroutines
// against the real backend, through the driver in-process (under -race) and through the running
// plugin's sockets, then checks refcounts, mounts, usability and leaks.
package stress
