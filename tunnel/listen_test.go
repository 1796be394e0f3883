package tunnel

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
)

// TestNoHandshakeBeforeRun: a server that has bound its addresses (Listen)
// but does not serve yet (Run: CloudCore waits for its caches first) must
// not answer handshakes. It did on QUIC: quic-go's listener handshakes on
// its own, so the TLS check asked a whitelist that had not synced yet and
// refused allowed edges ("not on the whitelist") right after a restart.
// The edge's datagrams wait in the socket instead, and the dial in flight
// completes once Run starts.
func TestNoHandshakeBeforeRun(t *testing.T) {
	ca := newTestCA(t)
	var asked atomic.Int32
	cfg := ServerConfig{
		Options: testOptions(), QUICAddr: "127.0.0.1:0", TLS: ca.serverTLS(t), Handler: echo,
		Authorize: func(Identity) error { asked.Add(1); return nil },
	}
	cfg.Registerer = prometheus.NewRegistry()
	srv, err := NewServer(cfg)
	require.NoError(t, err)
	require.NoError(t, srv.Listen())
	require.NotNil(t, srv.QUICAddr(), "bound by Listen")

	c := newTestClient(t, ca, "edge-early", "quic://"+srv.QUICAddr().String())
	type result struct {
		s   *Session
		err error
	}
	dialed := make(chan result, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		s, err := c.Dial(ctx)
		dialed <- result{s, err}
	}()
	// The client has sent its Initial datagrams by now several times over
	// (it retransmits them): none may have been answered.
	require.Never(t, func() bool { return asked.Load() > 0 }, 2*time.Second, 50*time.Millisecond,
		"handshake answered before Run")

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	defer func() { cancel(); require.NoError(t, <-done) }()
	r := <-dialed
	require.NoError(t, r.err, "the dial in flight completes once the server runs")
	requireSessionEchoes(t, r.s)
	require.NoError(t, r.s.Close("done"))
	require.Positive(t, asked.Load())
}
