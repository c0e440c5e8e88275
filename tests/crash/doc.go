// Package crash kills the real plugin with SIGKILL at every fault point, restarts it and proves
// that nothing leaked, nothing half-made is listed, Docker agrees with the plugin, and the
// interrupted operation succeeds when retried.
package crash
