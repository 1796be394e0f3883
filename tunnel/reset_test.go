package tunnel

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/common/message"
)

// TestStatelessResetAfterCrash: a server that vanishes without closing its
// connections (a crash) and comes back on the same address with the same
// stateless reset key ends the old client sessions at once, with a
// stateless reset, instead of leaving them to the dead-peer timeout. The
// same restart without a key leaves the client waiting.
//
// The client sends a message after the crash, as an edge's next lease or
// status write does: quic-go answers only packets over 42 B with a reset,
// and a keepalive PING is smaller. (Until path-MTU discovery was turned
// off, the probes of a new connection triggered it; an idle connection
// whose probing had ended was not reset either.)
func TestStatelessResetAfterCrash(t *testing.T) {
	ca := newTestCA(t)
	key := &[32]byte{1, 2, 3}
	for _, tt := range []struct {
		name  string
		key   *[32]byte
		reset bool
	}{{"with key", key, true}, {"without key", nil, false}} {
		t.Run(tt.name, func(t *testing.T) {
			opts := testOptions()
			opts.DeadPeerTimeout = 20 * time.Second // far longer than the reset may take
			crash := func(addr string) (*Server, func()) {
				srv, err := NewServer(ServerConfig{Options: opts, QUICAddr: addr, TLS: ca.serverTLS(t), Handler: echo, StatelessResetKey: tt.key})
				require.NoError(t, err)
				require.NoError(t, srv.Listen())
				ctx, cancel := context.WithCancel(context.Background())
				done := make(chan error, 1)
				go func() { done <- srv.Run(ctx) }()
				return srv, func() { cancel(); <-done }
			}
			first, stopFirst := crash("127.0.0.1:0")
			addr := first.QUICAddr().String()
			c, err := NewClient(ClientConfig{Options: opts, Servers: []string{"quic://" + addr}, Node: "edge-1", TLS: ca.clientTLS(t, certOpts{cn: "edge-1"})})
			require.NoError(t, err)
			sess, err := c.Dial(context.Background())
			require.NoError(t, err)
			defer sess.Close("test done")
			// The crash: the socket goes away under the connections, so no
			// CONNECTION_CLOSE ever reaches the client.
			first.mu.Lock()
			udp := first.quicTr.Conn.(*net.UDPConn)
			first.mu.Unlock()
			require.NoError(t, udp.Close())
			stopFirst()
			_, stopSecond := crash(addr)
			defer stopSecond()
			// Send returns once the message is queued (or the session ended).
			_ = sess.Send(context.Background(), &message.Message{Kind: message.KindEvent, Op: message.OpUpsert, ID: 1, Payload: []byte("lease")})
			select {
			case <-sess.Done():
				require.True(t, tt.reset, "without a key the session can only end at the dead-peer timeout: %v", sess.Err())
			case <-time.After(5 * time.Second):
				require.False(t, tt.reset, "the restarted server did not reset the old connection")
			}
		})
	}
}
