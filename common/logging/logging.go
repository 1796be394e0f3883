// Package logging builds a daemon's process logger: log/slog text on a
// writer, with the Kubernetes libraries' klog output (client-go's leader
// election and informers, the CRI client) routed through it so that one
// format reaches the operator. klog's logger is process-wide, so only an
// entry point (cloudcore/cmd, edgecore/cmd) calls New; components get the
// logger injected and must not call New themselves.
package logging

import (
	"io"
	"log/slog"

	"k8s.io/klog/v2"
)

// New returns a text logger writing to w at level, and makes it klog's.
func New(w io.Writer, level slog.Level) *slog.Logger {
	logger := slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
	klog.SetSlogLogger(logger)
	return logger
}
