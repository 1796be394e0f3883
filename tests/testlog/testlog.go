// Package testlog is the one logger of the project's tests: silent by
// default, every component's debug logs on stderr when TETHER_TEST_LOG is
// set. It is for tests only.
package testlog

import (
	"log/slog"
	"os"
)

// New returns a discard logger, or a debug text logger on stderr when
// TETHER_TEST_LOG is set.
func New() *slog.Logger {
	if os.Getenv("TETHER_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}
