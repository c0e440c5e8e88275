// Package hostile feeds the real plugin garbage, exhausts its space, holds its volumes busy and
// probes its sockets, and proves each time that it answers with a clear error, creates and
// touches nothing it should not, and keeps serving.
package hostile
