package hub_test

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/cloudcore/onboard"
	"github.com/tetheredge/tether/tunnel"
)

// A node disabled after its TLS handshake was authorised but before its
// hello registered the session must not keep that session.
func TestDisableBetweenHandshakeAndHello(t *testing.T) {
	c := newCluster(t)
	node, tok := c.allow(t, "race")
	id := c.startJoin(t, 0).join(t, node, tok)

	changed := make(chan string, 64)
	var armed atomic.Bool
	var once sync.Once
	r := c.startReplica(t, replicaHooks{
		changed: func(n string) {
			if n == node {
				changed <- n
			}
		},
		authorize: func(peer tunnel.Identity, authorize func(tunnel.Identity) error) error {
			err := authorize(peer)
			if err == nil && peer.Node == node && armed.Load() {
				// The handshake is authorised; the operator disables the
				// node before the hello arrives, and the whitelist has told
				// the hub (which has no session of the node yet).
				once.Do(func() {
					_, derr := onboard.Disable(t.Context(), c.nodes, node)
					require.NoError(t, derr)
					// A notification that comes once the cache refuses the
					// node: the hub has handled the disable's event (the
					// cache is updated before its handlers run).
					for {
						select {
						case <-changed:
						case <-time.After(waitFor):
							t.Errorf("the whitelist did not see the disable")
							return
						}
						if authorize(peer) != nil {
							return
						}
					}
				})
			}
			return err
		},
	})
	// The whitelist writes nothing when a node connects (the connection
	// writer records it, and this replica runs none): no EdgeNode event
	// follows the next connection by chance.
	s, err := c.dial(t, r, id)
	require.NoError(t, err)
	require.NoError(t, s.Close("edge restarts"))

	armed.Store(true)
	s, err = c.dial(t, r, id)
	if err != nil {
		require.ErrorContains(t, err, "disabled")
		return
	}
	requireClosed(t, s, "disabled")
	require.Eventually(t, func() bool { return len(r.hub.Connected()) == 0 }, waitFor, 10*time.Millisecond)
}

// A re-join supersedes the serial: the old certificate's live session ends
// at once, on a replica other than the one that served the join, without
// any admin call.
func TestRejoinClosesOldSessionOnEveryReplica(t *testing.T) {
	c := newCluster(t)
	node, tok := c.allow(t, "rejoin")
	js := c.startJoin(t, 0) // replica A's join endpoint
	a := c.startReplica(t, replicaHooks{})
	b := c.startReplica(t, replicaHooks{})
	old := js.join(t, node, tok)
	s, err := c.dial(t, b, old)
	require.NoError(t, err)
	require.Eventually(t, func() bool { return len(b.hub.Connected()) == 1 }, waitFor, 10*time.Millisecond)

	// The node's operator issues a new token (the node stays allowed) and
	// the node joins again through replica A.
	tok2, _, err := onboard.Allow(t.Context(), c.nodes, c.ca.Cert, node, onboard.AllowOptions{})
	require.NoError(t, err)
	fresh := js.join(t, node, tok2)

	requireClosed(t, s, "not its current one")
	waitRefused(t, a, old)
	require.NoError(t, a.wl.Authorize(fresh.peer()))
	s2, err := c.dial(t, b, fresh)
	require.NoError(t, err)
	_, err = c.dial(t, a, old)
	require.Error(t, err, "the superseded certificate must be refused")
	select {
	case <-s2.Done():
		t.Fatalf("the new session was closed: %v", s2.Err())
	default:
	}
}

// Re-enabling a disabled node must not make the certificate it was
// disabled with valid again.
func TestAllowAfterDisableKeepsOldCertificateRefused(t *testing.T) {
	c := newCluster(t)
	node, tok := c.allow(t, "reallow")
	old := c.startJoin(t, 0).join(t, node, tok)
	r := c.startReplica(t, replicaHooks{})
	s, err := c.dial(t, r, old)
	require.NoError(t, err)

	_, err = onboard.Disable(t.Context(), c.nodes, node)
	require.NoError(t, err)
	requireClosed(t, s, "disabled")

	_, e, err := onboard.Allow(t.Context(), c.nodes, c.ca.Cert, node, onboard.AllowOptions{})
	require.NoError(t, err)
	// Wait for the whitelist to see the node allowed again, then the old
	// certificate must still be refused, at the handshake and by the hub.
	require.Eventually(t, func() bool {
		got, ok := r.wl.Get(node)
		return ok && got.ResourceVersion == e.ResourceVersion
	}, waitFor, 10*time.Millisecond)
	require.ErrorContains(t, r.wl.Authorize(old.peer()), "no certificate on record")
	_, err = c.dial(t, r, old)
	require.Error(t, err, "the certificate of before the disable connected again")
}

// A session ends when its certificate expires, with no reconnection or
// whitelist change to notice it.
func TestSessionEndsWhenCertificateExpires(t *testing.T) {
	c := newCluster(t)
	node, _ := c.allow(t, "expire")
	id := c.record(t, node, 4*time.Second)
	r := c.startReplica(t, replicaHooks{})
	require.Eventually(t, func() bool { return r.wl.Authorize(id.peer()) == nil }, waitFor, 10*time.Millisecond)
	s, err := c.dial(t, r, id)
	require.NoError(t, err)
	requireClosed(t, s, "expired")
	require.False(t, time.Now().Before(id.cert.NotAfter), "closed before the certificate expired")
}

// A renewal whose reply never reaches the edge: the old certificate still
// connects; once the edge has connected with the new one, the old one is
// refused.
func TestLostRenewalReplyKeepsOldCertificate(t *testing.T) {
	c := newCluster(t)
	node, tok := c.allow(t, "lostreply")
	old := c.startJoin(t, 0).join(t, node, tok)
	r := c.startReplica(t, replicaHooks{})
	renewer, err := onboard.NewRenewer(onboard.RenewerConfig{EdgeNodes: c.nodes, Issuer: &onboard.Issuer{CA: c.ca}})
	require.NoError(t, err)

	s, err := c.dial(t, r, old)
	require.NoError(t, err)
	key, csr := newKey(t)
	cert, err := renewer.Renew(t.Context(), node, old.serial(), csr)
	require.NoError(t, err)
	fresh := identity{key: key, cert: cert}
	// The reply is lost: the edge keeps the old certificate. Its session
	// survives the change and it can connect again with it.
	require.Eventually(t, func() bool { return r.wl.Authorize(fresh.peer()) == nil }, waitFor, 10*time.Millisecond)
	select {
	case <-s.Done():
		t.Fatalf("the renewal closed the session of the old certificate: %v", s.Err())
	default:
	}
	require.NoError(t, s.Close("edge restarts"))
	// Another replica still serves a session of the old certificate (say,
	// the edge's connection there has not noticed it is gone yet).
	other := c.startReplica(t, replicaHooks{})
	s, err = c.dial(t, other, old)
	require.NoError(t, err, "the old certificate is refused after a renewal the edge never received")

	// The edge connects with the new certificate: from then on the old one
	// is refused, on every replica (the grace ends in the EdgeNode), and
	// the other replica's session of it ends.
	_, err = c.dial(t, r, fresh)
	require.NoError(t, err)
	require.Eventually(t, func() bool { return c.get(t, node).Status.Previous == nil }, waitFor, 10*time.Millisecond)
	requireClosed(t, s, "not its current one")
	waitRefused(t, r, old)
	_, err = c.dial(t, r, old)
	require.Error(t, err)
}

// One node, one session: a new session of the node replaces the older
// one, which is closed, and the hub lists the node once.
func TestNewSessionReplacesOld(t *testing.T) {
	c := newCluster(t)
	node, tok := c.allow(t, "replace")
	id := c.startJoin(t, 0).join(t, node, tok)
	r := c.startReplica(t, replicaHooks{})
	first, err := c.dial(t, r, id)
	require.NoError(t, err)
	second, err := c.dial(t, r, id)
	require.NoError(t, err)
	requireClosed(t, first, "replaced by a newer session")
	require.Equal(t, []string{node}, r.hub.Connected())
	select {
	case <-second.Done():
		t.Fatalf("the newer session was closed: %v", second.Err())
	default:
	}
}
