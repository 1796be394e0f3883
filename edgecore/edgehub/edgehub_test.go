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
	srv, sessions, clientTLS := startCloud(t, nil)
	// "host:port": TCP reaches WebSocket, UDP goes into a blackhole.
	_, port, err := net.SplitHostPort(srv.WebSocketAddr().String())
	require.NoError(t, err)
	addr := net.JoinHostPort("127.0.0.1", port)
	proxy := netproxy.Start(t, srv.QUICAddr().String(), netproxy.Options{Network: "udp", Listen: addr})
	proxy.Partition(true)

	path := filepath.Join(t.TempDir(), "edgecore.db")
	cfg := tunnel.ClientConfig{Servers: []string{addr}, TLS: clientTLS, DialTimeout: time.Minute}
	st, s, stop := startHub(t, path, cfg, sessions) // the default race delay
	tr := s.Transport()
	require.Equal(t, tunnel.TransportWebSocket, tr)
	require.Positive(t, proxy.Stats().Dropped, "the first start tried QUIC")
	require.Eventually(t, func() bool {
		got, err := st.LastTransport(context.Background())
		return err == nil && got == store.TransportWebSocket
	}, 30*time.Second, 10*time.Millisecond, "the transport that worked is recorded")
	stop()

	dropped := proxy.Stats().Dropped
	cfg.RaceDelay = time.Minute
	_, s, stop = startHub(t, path, cfg, sessions)
	defer stop()
	require.Equal(t, tunnel.TransportWebSocket, s.Transport(), "after a restart the remembered transport goes first")
	require.Equal(t, dropped, proxy.Stats().Dropped, "QUIC was not tried")
}

// startCloud runs a tunnel server on loopback until the test ends (mutate
// may change its config) and returns it, the channel its sessions arrive
// on, and the TLS config of a client for node edge-1.
func startCloud(t *testing.T, mutate func(*tunnel.ServerConfig)) (*tunnel.Server, <-chan *tunnel.Session, *tls.Config) {
	t.Helper()
	ca, err := pki.NewCA("edgehub-test", time.Hour)
	require.NoError(t, err)
	srvCert, srvKey, err := ca.Issue(pki.LeafRequest{CommonName: "cloudcore", Usage: pki.UsageServer, Hosts: []string{"127.0.0.1"}, Validity: time.Hour})
	require.NoError(t, err)
	cliCert, cliKey, err := ca.Issue(pki.LeafRequest{CommonName: "edge-1", Usage: pki.UsageClient, Validity: time.Hour})
	require.NoError(t, err)

	sessions := make(chan *tunnel.Session, 4)
	cfg := tunnel.ServerConfig{
		Options:       tunnel.Options{Logger: testlog.New()},
		QUICAddr:      "127.0.0.1:0",
		WebSocketAddr: "127.0.0.1:0",
		TLS:           &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{srvCert.Raw}, PrivateKey: srvKey}}, ClientCAs: ca.Pool(), MinVersion: tls.VersionTLS13},
		Handler: tunnel.HandlerFunc(func(ctx context.Context, s *tunnel.Session) {
			sessions <- s
			_ = hold{}.Serve(ctx, s)
		}),
	}
	if mutate != nil {
		mutate(&cfg)
	}
	srv, err := tunnel.NewServer(cfg)
	require.NoError(t, err)
	require.NoError(t, srv.Listen())
	sctx, stopServer := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Run(sctx) }()
	t.Cleanup(func() { stopServer(); require.NoError(t, <-served) })
	clientTLS := &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{cliCert.Raw}, PrivateKey: cliKey}}, RootCAs: ca.Pool(), MinVersion: tls.VersionTLS13}
	return srv, sessions, clientTLS
}

// TestResumesAcrossRestarts: the hub keeps the client's TLS session ticket
// in the store, so that after a restart (a new client and hub, the store
// file reopened) the first session resumes instead of exchanging
// certificates.
func TestResumesAcrossRestarts(t *testing.T) {
	secret := [32]byte{42}
	srv, sessions, clientTLS := startCloud(t, func(c *tunnel.ServerConfig) { c.SessionTicketSecret = &secret })
	path := filepath.Join(t.TempDir(), "edgecore.db")
	cfg := tunnel.ClientConfig{Servers: []string{"quic://" + srv.QUICAddr().String()}, TLS: clientTLS}
	st, s, stop := startHub(t, path, cfg, sessions)
	require.False(t, s.Resumed(), "the first session had no ticket to resume")
	require.Eventually(t, func() bool {
		data, err := st.LoadTicket(context.Background(), "quic/127.0.0.1")
		return err == nil && data != nil
	}, 30*time.Second, 10*time.Millisecond, "the ticket is kept in the store")
	stop()

	_, s, stop = startHub(t, path, cfg, sessions)
	defer stop()
	require.True(t, s.Resumed(), "after a restart the session did a full handshake")
}

// startHub starts an EdgeHub for node edge-1 on the store file at path,
// with a client of cfg, and returns the store, the first session the
// server saw, and a function that stops the hub and closes the store.
func startHub(t *testing.T, path string, cfg tunnel.ClientConfig, sessions <-chan *tunnel.Session) (*store.Store, *tunnel.Session, func()) {
	t.Helper()
	st, err := store.Open(context.Background(), path, testlog.New())
	require.NoError(t, err)
	cfg.Options.Logger = testlog.New()
	cfg.Node = "edge-1"
	client, err := tunnel.NewClient(cfg)
	require.NoError(t, err)
	hub := New(client, hold{}, st, testlog.New())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- hub.Run(ctx) }()
	stop := func() {
		cancel()
		require.NoError(t, <-done)
		require.NoError(t, st.Close())
	}
	select {
	case s := <-sessions:
		return st, s, stop
	case <-time.After(30 * time.Second):
		stop()
		t.Fatal("no session within 30s")
		return nil, nil, nil
	}
}
