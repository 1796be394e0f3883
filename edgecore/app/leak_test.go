package app_test

import (
	"context"
	"log/slog"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
	"k8s.io/klog/v2"

	"github.com/tetheredge/tether/edgecore/app"
	"github.com/tetheredge/tether/tests/containerd"
)

// While the in-process shim cannot answer (here: containerd went away
// after EdgeCore was built), EdgeCore keeps trying to connect the pod
// manager to the shim; no attempt leaks a gRPC connection. cri-client's
// constructors leak theirs when their Version check fails, and every
// start of EdgeCore made at least one such attempt before its shim
// served (the end-to-end tests' leak check found it).
func TestShimRetriesLeakNothing(t *testing.T) {
	h := containerd.Start(t)
	ctx, cancel := context.WithTimeout(klog.NewContext(context.Background(), logr.Discard()), 2*time.Minute)
	defer cancel()
	cfg := config(t)
	cfg.CRI = app.CRIConfig{Listen: filepath.Join(t.TempDir(), "cri.sock"), Containerd: h.Endpoint()}
	warned := &messageCounter{msg: "cri shim not answering yet"}
	cfg.Logger = slog.New(warned)
	a, err := app.New(ctx, cfg)
	require.NoError(t, err)
	require.NoError(t, h.Stop())
	before := goleak.IgnoreCurrent()

	stop := run(ctx, t, a)
	// The warning comes once the retry delay has grown to a second, after
	// six failed attempts; wait for two more.
	require.Eventually(t, func() bool { return warned.n.Load() >= 3 }, time.Minute, 20*time.Millisecond)
	stop()
	require.NoError(t, a.Close())
	goleak.VerifyNone(t, before)
}

// messageCounter is a slog handler that counts the records with one
// message.
type messageCounter struct {
	msg string
	n   atomic.Int64
}

func (c *messageCounter) Enabled(context.Context, slog.Level) bool { return true }

func (c *messageCounter) Handle(_ context.Context, r slog.Record) error {
	if r.Message == c.msg {
		c.n.Add(1)
	}
	return nil
}

func (c *messageCounter) WithAttrs([]slog.Attr) slog.Handler { return c }
func (c *messageCounter) WithGroup(string) slog.Handler      { return c }
