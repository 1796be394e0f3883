package e2e

import (
	"context"
	"crypto"
	"crypto/tls"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tetheredge/tether/cloudcore/app"
	"github.com/tetheredge/tether/cloudcore/onboard"
	"github.com/tetheredge/tether/common/pki"
	edgejoin "github.com/tetheredge/tether/edgecore/join"
	"github.com/tetheredge/tether/edgecore/syncer"
	"github.com/tetheredge/tether/tests/testlog"
	"github.com/tetheredge/tether/tunnel"
)

// startJoinedEdge runs EdgeCore from the identity `edgecore join` stored
// in dir, as the edgecore command does.
func startJoinedEdge(t *testing.T, c *cloud, node, dir string) *edge {
	t.Helper()
	pair, _, leaf, err := edgejoin.Load(dir)
	require.NoError(t, err)
	require.NoError(t, edgejoin.CheckUsable(leaf, time.Now()))
	pair.Leaf = leaf
	key, ok := pair.PrivateKey.(crypto.Signer)
	require.True(t, ok)
	return startEdge(t, identity{node: node, cert: pair, key: key, ca: c.app.CA().Cert}, dir, c.addr, edgeOptions{timings: testTimings})
}

// connected reports whether the cloud has a live session of node.
func connected(c *cloud, node string) bool { return slices.Contains(c.app.Connected(), node) }

// dialAs tries a session with the given client certificate and hello node.
func dialAs(a *app.App, node string, cert tls.Certificate) error {
	pool := a.CA().Pool()
	c, err := tunnel.NewClient(tunnel.ClientConfig{
		Options: tunnel.Options{Logger: testlog.New()}, Servers: []string{"quic://" + a.QUICAddr().String()}, Node: node,
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

func tunnelRefused(t *testing.T, c *cloud, reason string) float64 {
	t.Helper()
	return c.counter(t, "tether_tunnel_refused_total", map[string]string{"reason": reason})
}

// TestOnboarding walks the whole whitelist path on the real wiring: allow,
// join, connect, sync; the handshake refusals; renewal over the live
// session; disabling a node.
func TestOnboarding(t *testing.T) {
	env := cp.Env(t)
	cs := adminClient(t, env.Config)
	ctx := context.Background()
	c := startCloud(t, env.Config, cloudOptions{webSocket: true, timings: testTimings, certValidity: 40 * time.Second})
	a := c.app
	const node = "edge-join"
	t.Cleanup(func() {
		_ = a.EdgeNodes().Delete(context.Background(), node)
		_ = cs.CoreV1().Nodes().Delete(context.Background(), node, metav1.DeleteOptions{})
	})

	// Not on the whitelist: a certificate signed by the real CA is still refused.
	before := tunnelRefused(t, c, "authorize")
	require.Error(t, dialAs(a, "edge-ghost", tlsPair(a.CA(), "edge-ghost", t)))
	require.Greater(t, tunnelRefused(t, c, "authorize"), before, "a CA-signed certificate of a node not on the whitelist is refused")

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

	e := startJoinedEdge(t, c, node, dir)
	sessions := func() float64 { return e.counter(t, "tether_tunnel_sessions_opened_total", nil) }
	require.Eventually(t, func() bool { return connected(c, node) }, 30*time.Second, 20*time.Millisecond, "the joined edge connects")
	// The edge counts its session once its own side is up, which can be
	// just after the cloud registered it.
	require.Eventually(t, func() bool { return sessions() == 1 }, 10*time.Second, 10*time.Millisecond, "the edge opened one session")
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
		before := tunnelRefused(t, c, r.reason)
		require.Error(t, dialAs(a, r.hello, r.cert), r.name)
		require.Eventually(t, func() bool {
			return c.poll("tether_tunnel_refused_total", map[string]string{"reason": r.reason}) > before
		}, 5*time.Second, 10*time.Millisecond, r.name)
	}
	require.True(t, connected(c, node), "the live session is untouched")
	// The only second session allowed here is the renewal's reconnect:
	// on a loaded machine the refusals can take until the certificate is
	// due. The count is read before the serial, and the edge installs the
	// renewed certificate before it reconnects, so a second session with
	// the old serial is one a refusal caused.
	if s := sessions(); s != 1 {
		require.NotEqual(t, res.Serial, e.app.Certificate().SerialNumber.Text(16),
			"the live session is untouched: a second session without a renewal")
		require.Equal(t, 2.0, s, "the live session is untouched: only the renewal reconnects")
	}

	// Renewal over the live session at 80% of the 40 s lifetime (the
	// renewed edge reconnects, a second session). The lifetime leaves the
	// old certificate several seconds of validity after the reconnect, so
	// that its refusal below is for being superseded, not expired.
	require.Eventually(t, func() bool {
		return e.app.Certificate().SerialNumber.Text(16) != res.Serial
	}, time.Minute, 100*time.Millisecond, "the edge renews its certificate")
	en, err := a.EdgeNodes().Get(ctx, node)
	require.NoError(t, err)
	require.Equal(t, e.app.Certificate().SerialNumber.Text(16), en.Status.Certificate.Serial)
	// The renewed edge reconnects at once with its new certificate, which
	// ends the old one's grace (kept in case the reply had been lost):
	// from then on the superseded certificate is refused.
	require.Eventually(t, func() bool {
		en, err := a.EdgeNodes().Get(ctx, node)
		return err == nil && en.Status.Previous == nil && connected(c, node)
	}, 30*time.Second, 50*time.Millisecond, "the edge reconnects with the renewed certificate, which ends the grace")
	before = tunnelRefused(t, c, "authorize")
	require.Error(t, dialAs(a, node, joined), "a certificate superseded by rotation is refused")
	require.Eventually(t, func() bool {
		return c.poll("tether_tunnel_refused_total", map[string]string{"reason": "authorize"}) > before
	}, 5*time.Second, 10*time.Millisecond, "the superseded certificate is refused by the whitelist")
	require.True(t, time.Now().Before(joined.Leaf.NotAfter), "the superseded certificate was still valid when refused")
	_, _, leaf, err := edgejoin.Load(dir)
	require.NoError(t, err)
	require.Equal(t, e.app.Certificate().SerialNumber, leaf.SerialNumber, "the renewed identity is stored for the next start")

	// Disabling the node closes its live session within seconds and
	// refuses its reconnects and renewals.
	_, err = onboard.Disable(ctx, a.EdgeNodes(), node)
	require.NoError(t, err)
	require.Eventually(t, func() bool { return !connected(c, node) }, 10*time.Second, 20*time.Millisecond,
		"the disabled node's session is closed")
	refusedBefore := tunnelRefused(t, c, "authorize")
	require.Eventually(t, func() bool {
		return c.poll("tether_tunnel_refused_total", map[string]string{"reason": "authorize"}) > refusedBefore
	}, 10*time.Second, 20*time.Millisecond,
		"the disabled node tries to reconnect and is refused")
	require.Never(t, func() bool { return connected(c, node) }, 2*time.Second, 50*time.Millisecond, "reconnects of a disabled node are refused")
	// Renewal needs a session, which a disabled node cannot have; the
	// cloud's refusal to renew for a disabled node is onboard's Renewer
	// test.
	require.ErrorIs(t, e.app.RenewOnce(ctx), syncer.ErrOffline, "a disabled node cannot renew: it cannot connect")
}
