package e2e

import (
	"context"
	"crypto/tls"
	"errors"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"

	"github.com/tetheredge/tether/cloudcore/app"
	"github.com/tetheredge/tether/cloudcore/onboard"
	"github.com/tetheredge/tether/common/pki"
	"github.com/tetheredge/tether/edgecore/certs"
	"github.com/tetheredge/tether/edgecore/edgehub"
	edgejoin "github.com/tetheredge/tether/edgecore/join"
	"github.com/tetheredge/tether/edgecore/nodestatus"
	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/edgecore/syncer"
	"github.com/tetheredge/tether/tunnel"
)

// startApp runs the real CloudCore wiring (cloudcore/app) on loopback.
func startApp(t *testing.T, cfg *rest.Config, certValidity time.Duration) (*app.App, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	ctx, cancel := context.WithCancel(context.Background())
	a, err := app.New(ctx, app.Config{
		Kubernetes: rest.CopyConfig(cfg), QUICAddr: "127.0.0.1:0", WebSocketAddr: "127.0.0.1:0", JoinAddr: "127.0.0.1:0",
		ServerSANs: []string{"127.0.0.1"}, CertValidity: certValidity,
		KeepAlive: 200 * time.Millisecond, DeadPeerTimeout: 2 * time.Second, Logger: logger(), Registerer: reg,
	})
	require.NoError(t, err)
	require.NoError(t, a.Listen())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
	})
	return a, reg
}

// joinedEdge is an EdgeCore started from the identity `edgecore join` stored.
type joinedEdge struct {
	st       *store.Store
	holder   *certs.Holder
	rotator  *certs.Rotator
	sessions chan *tunnel.Session
	stop     func()
}

func startJoinedEdge(t *testing.T, a *app.App, node, dir string) *joinedEdge {
	t.Helper()
	pair, pool, leaf, err := edgejoin.Load(dir)
	require.NoError(t, err)
	require.NoError(t, edgejoin.CheckUsable(leaf, time.Now()))
	ctx, cancel := context.WithCancel(context.Background())
	st, err := store.Open(ctx, dir+"/edge.db", logger())
	require.NoError(t, err)
	sy, err := syncer.New(st, syncer.Config{}, logger(), nil)
	require.NoError(t, err)
	holder := certs.NewHolder(pair)
	client, err := tunnel.NewClient(tunnel.ClientConfig{
		Options: tunnel.Options{KeepAlive: 200 * time.Millisecond, DeadPeerTimeout: 2 * time.Second, Logger: logger()},
		Servers: []string{"quic://" + a.QUICAddr().String()}, Node: node,
		TLS:     &tls.Config{GetClientCertificate: holder.GetClientCertificate, RootCAs: pool, MinVersion: tls.VersionTLS13},
		Backoff: tunnel.Backoff{Min: 50 * time.Millisecond, Max: 300 * time.Millisecond},
	})
	require.NoError(t, err)
	rot := certs.NewRotator(dir, node, a.CA().Cert, holder, sy.Renew, logger(), nil)
	e := &joinedEdge{st: st, holder: holder, rotator: rot, sessions: make(chan *tunnel.Session, 16)}
	hub := edgehub.New(client, protocolFunc(func(ctx context.Context, s *tunnel.Session) error {
		select {
		case e.sessions <- s:
		default:
		}
		return sy.Serve(ctx, s)
	}), logger())
	rep, err := nodestatus.New(nodestatus.Config{Node: node}, sy, logger())
	require.NoError(t, err)
	done := make(chan error, 3)
	go func() { done <- hub.Run(ctx) }()
	go func() { done <- rot.Run(ctx) }()
	go func() { done <- rep.Run(ctx) }()
	stopped := false
	e.stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		for range 3 {
			require.NoError(t, <-done)
		}
		require.NoError(t, st.Close())
	}
	t.Cleanup(e.stop)
	return e
}

type protocolFunc func(ctx context.Context, s *tunnel.Session) error

func (f protocolFunc) Serve(ctx context.Context, s *tunnel.Session) error { return f(ctx, s) }

// dialAs tries a session with the given client certificate and hello node.
func dialAs(a *app.App, node string, cert tls.Certificate) error {
	pool := a.CA().Pool()
	c, err := tunnel.NewClient(tunnel.ClientConfig{
		Options: tunnel.Options{Logger: logger()}, Servers: []string{"quic://" + a.QUICAddr().String()}, Node: node,
		TLS: &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool, MinVersion: tls.VersionTLS13}, DialTimeout: 3 * time.Second,
	})
	if err != nil {
		return err
	}
	s, err := c.Dial(context.Background())
	if err != nil {
		return err
	}
	// The handshake hook refuses during TLS; a refused client may still
	// see its dial "succeed" and then lose the session at once.
	select {
	case <-s.Done():
		return s.Err()
	case <-time.After(500 * time.Millisecond):
		_ = s.Close("probe done")
		return nil
	}
}

func tlsPair(cert *pki.CA, node string, t *testing.T) tls.Certificate {
	c, k, err := cert.Issue(pki.LeafRequest{CommonName: node, Usage: pki.UsageClient, Validity: time.Hour})
	require.NoError(t, err)
	return tls.Certificate{Certificate: [][]byte{c.Raw}, PrivateKey: k, Leaf: c}
}

func tunnelRefused(t *testing.T, reg *prometheus.Registry, reason string) float64 {
	t.Helper()
	c := &cloud{reg: reg}
	return c.counter(t, "tether_tunnel_refused_total", map[string]string{"reason": reason})
}

// TestOnboarding walks the whole whitelist path on the real wiring: allow,
// join, connect, sync; the handshake refusals; renewal over the live
// session; disabling a node.
func TestOnboarding(t *testing.T) {
	env := cp.Env(t)
	cs := adminClient(t, env.Config)
	ctx := context.Background()
	a, reg := startApp(t, env.Config, 12*time.Second)
	const node = "edge-join"
	t.Cleanup(func() {
		_ = a.EdgeNodes().Delete(context.Background(), node)
		_ = cs.CoreV1().Nodes().Delete(context.Background(), node, metav1.DeleteOptions{})
	})

	// Not on the whitelist: a certificate signed by the real CA is still refused.
	before := tunnelRefused(t, reg, "authorize")
	require.Error(t, dialAs(a, "edge-ghost", tlsPair(a.CA(), "edge-ghost", t)))
	require.Greater(t, tunnelRefused(t, reg, "authorize"), before, "a CA-signed certificate of a node not on the whitelist is refused")

	tok, _, err := onboard.Allow(ctx, a.EdgeNodes(), a.CA().Cert, node, onboard.AllowOptions{Labels: map[string]string{"site": "shop-9"}})
	require.NoError(t, err)
	dir := t.TempDir()
	res, err := edgejoin.Join(ctx, edgejoin.Config{Cloud: a.JoinAddr().String(), Token: tok.String(), Node: node, Dir: dir})
	require.NoError(t, err)

	// The token was single-use.
	_, err = edgejoin.Join(ctx, edgejoin.Config{Cloud: a.JoinAddr().String(), Token: tok.String(), Node: node, Dir: t.TempDir()})
	var refused *edgejoin.RefusedError
	require.ErrorAs(t, err, &refused)
	require.Contains(t, refused.Reason, "not valid")

	e := startJoinedEdge(t, a, node, dir)
	first := <-e.sessions
	// The edge registers its Node; CloudCore applies the whitelist's labels.
	require.Eventually(t, func() bool {
		n, err := cs.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		return err == nil && n.Labels["site"] == "shop-9"
	}, 30*time.Second, 50*time.Millisecond)
	require.Eventually(t, func() bool {
		en, err := a.EdgeNodes().Get(ctx, node)
		return err == nil && en.Status.LastConnected != nil
	}, 30*time.Second, 50*time.Millisecond, "the connection is recorded")

	// Handshake refusals, each counted, none harming the live session.
	other, err := pki.NewCA("other", time.Hour)
	require.NoError(t, err)
	joined, err := tls.LoadX509KeyPair(res.CertPath, res.KeyPath)
	require.NoError(t, err)
	selfCA, err := pki.NewCA(node, time.Hour) // a self-signed certificate with the node's name
	require.NoError(t, err)
	refusals := []struct {
		name   string
		hello  string
		cert   tls.Certificate
		reason string
	}{
		{"certificate from another CA", node, tlsPair(other, node, t), "certificate"},
		{"self-signed certificate", node, tls.Certificate{Certificate: [][]byte{selfCA.Cert.Raw}, PrivateKey: selfCA.Key}, "certificate"},
		{"a joined node acting as another", "edge-other", joined, "node_mismatch"},
	}
	for _, r := range refusals {
		before := tunnelRefused(t, reg, r.reason)
		require.Error(t, dialAs(a, r.hello, r.cert), r.name)
		require.Eventually(t, func() bool { return tunnelRefused(t, reg, r.reason) > before }, 5*time.Second, 10*time.Millisecond, r.name)
	}
	require.NoError(t, first.Err(), "the live session is untouched")

	// Renewal over the live session at 80% of the 12s lifetime, without
	// dropping it; the old certificate is superseded.
	require.Eventually(t, func() bool {
		return e.holder.Leaf().SerialNumber.Text(16) != res.Serial
	}, 30*time.Second, 100*time.Millisecond, "the edge renews its certificate")
	require.NoError(t, first.Err(), "renewal did not drop the session")
	en, err := a.EdgeNodes().Get(ctx, node)
	require.NoError(t, err)
	require.Equal(t, e.holder.Leaf().SerialNumber.Text(16), en.Status.Certificate.Serial)
	before = tunnelRefused(t, reg, "authorize")
	require.Error(t, dialAs(a, node, joined), "a certificate superseded by rotation is refused")
	require.Greater(t, tunnelRefused(t, reg, "authorize"), before)
	_, _, leaf, err := edgejoin.Load(dir)
	require.NoError(t, err)
	require.Equal(t, e.holder.Leaf().SerialNumber, leaf.SerialNumber, "the renewed identity is stored for the next start")

	// Disabling the node closes its live session within seconds and
	// refuses its reconnects and renewals.
	_, err = onboard.Disable(ctx, a.EdgeNodes(), node)
	require.NoError(t, err)
	var current *tunnel.Session
	for current == nil {
		select {
		case s := <-e.sessions:
			if s.Err() == nil {
				current = s
			}
		default:
			current = first
		}
	}
	select {
	case <-current.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the disabled node's session was not closed")
	}
	require.Never(t, func() bool { return len(a.Connected()) > 0 }, 2*time.Second, 100*time.Millisecond, "reconnects of a disabled node are refused")
	err = e.rotator.RenewOnce(ctx)
	require.Error(t, err, "a disabled node cannot renew")
	require.True(t, errors.Is(err, syncer.ErrOffline) || err != nil)
}
