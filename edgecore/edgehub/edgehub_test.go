package edgehub

import (
	"context"
	"crypto/tls"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/tetheredge/tether/common/pki"
	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/tests/netproxy"
	"github.com/tetheredge/tether/tests/testlog"
	"github.com/tetheredge/tether/tunnel"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// hold serves a session by holding it until it or the hub ends.
type hold struct{}

func (hold) Serve(ctx context.Context, s *tunnel.Session) error {
	select {
	case <-ctx.Done():
	case <-s.Done():
	}
	return nil
}

// TestRemembersTransportAcrossRestarts: where UDP is blackholed, the first
// EdgeHub reaches the cloud over WebSocket (the client's race) and records
// it in the store. After a restart (a new client and hub, the store file
// reopened) the hub starts with WebSocket: its client is given a race
// delay of a minute, so a hub that forgot would sit in QUIC's handshake
// for a minute, and no QUIC datagram reaches the blackhole.
func TestRemembersTransportAcrossRestarts(t *testing.T) {
	ca, err := pki.NewCA("edgehub-test", time.Hour)
	require.NoError(t, err)
	srvCert, srvKey, err := ca.Issue(pki.LeafRequest{CommonName: "cloudcore", Usage: pki.UsageServer, Hosts: []string{"127.0.0.1"}, Validity: time.Hour})
	require.NoError(t, err)
	cliCert, cliKey, err := ca.Issue(pki.LeafRequest{CommonName: "edge-1", Usage: pki.UsageClient, Validity: time.Hour})
	require.NoError(t, err)

	sessions := make(chan *tunnel.Session, 4)
	srv, err := tunnel.NewServer(tunnel.ServerConfig{
		Options:       tunnel.Options{Logger: testlog.New()},
		QUICAddr:      "127.0.0.1:0",
		WebSocketAddr: "127.0.0.1:0",
		TLS:           &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{srvCert.Raw}, PrivateKey: srvKey}}, ClientCAs: ca.Pool(), MinVersion: tls.VersionTLS13},
		Handler: tunnel.HandlerFunc(func(ctx context.Context, s *tunnel.Session) {
			sessions <- s
			_ = hold{}.Serve(ctx, s)
		}),
	})
	require.NoError(t, err)
	require.NoError(t, srv.Listen())
	sctx, stopServer := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Run(sctx) }()
	defer func() { stopServer(); require.NoError(t, <-served) }()
	// "host:port": TCP reaches WebSocket, UDP goes into a blackhole.
	_, port, err := net.SplitHostPort(srv.WebSocketAddr().String())
	require.NoError(t, err)
	addr := net.JoinHostPort("127.0.0.1", port)
	proxy := netproxy.Start(t, srv.QUICAddr().String(), netproxy.Options{Network: "udp", Listen: addr})
	proxy.Partition(true)

	path := filepath.Join(t.TempDir(), "edgecore.db")
	clientTLS := &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{cliCert.Raw}, PrivateKey: cliKey}}, RootCAs: ca.Pool(), MinVersion: tls.VersionTLS13}
	// run starts an EdgeHub on the store file and returns the transport of
	// its first session and a stop function.
	run := func(raceDelay time.Duration) (*store.Store, tunnel.Transport, func()) {
		st, err := store.Open(context.Background(), path, testlog.New())
		require.NoError(t, err)
		client, err := tunnel.NewClient(tunnel.ClientConfig{
			Options:     tunnel.Options{Logger: testlog.New()},
			Servers:     []string{addr},
			Node:        "edge-1",
			TLS:         clientTLS,
			DialTimeout: time.Minute,
			RaceDelay:   raceDelay,
		})
		require.NoError(t, err)
		hub := New(client, hold{}, st, testlog.New())
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- hub.Run(ctx) }()
		var tr tunnel.Transport
		select {
		case s := <-sessions:
			tr = s.Transport()
		case <-time.After(30 * time.Second):
			t.Error("no session within 30s")
		}
		return st, tr, func() {
			cancel()
			require.NoError(t, <-done)
			require.NoError(t, st.Close())
		}
	}

	st, tr, stop := run(0) // the default race delay
	require.Equal(t, tunnel.TransportWebSocket, tr)
	require.Positive(t, proxy.Stats().Dropped, "the first start tried QUIC")
	require.Eventually(t, func() bool {
		got, err := st.LastTransport(context.Background())
		return err == nil && got == store.TransportWebSocket
	}, 30*time.Second, 10*time.Millisecond, "the transport that worked is recorded")
	stop()

	dropped := proxy.Stats().Dropped
	_, tr, stop = run(time.Minute)
	defer stop()
	require.Equal(t, tunnel.TransportWebSocket, tr, "after a restart the remembered transport goes first")
	require.Equal(t, dropped, proxy.Stats().Dropped, "QUIC was not tried")
}
