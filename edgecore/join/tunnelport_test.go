package join

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	joinapi "github.com/tetheredge/tether/common/join"
	"github.com/tetheredge/tether/common/pki"
	"github.com/tetheredge/tether/tunnel"
)

// A join sent to CloudCore's tunnel port (a real tunnel server, WebSocket
// over TLS on loopback) instead of its join endpoint says so and what to
// give, not only the TLS refusal; the join endpoint itself is never
// taken for the tunnel (TestJoin: its server asks no client
// certificate).
func TestJoinTunnelPortSaysWhatToDo(t *testing.T) {
	ca := newCA(t)
	cert, key, err := ca.Issue(pki.LeafRequest{CommonName: "cloudcore", Usage: pki.UsageServer, Hosts: []string{"127.0.0.1"}, Validity: time.Hour})
	require.NoError(t, err)
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	srv, err := tunnel.NewServer(tunnel.ServerConfig{
		WebSocketAddr: "127.0.0.1:0",
		TLS:           &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert}}, ClientCAs: pool},
		Handler:       tunnel.HandlerFunc(func(context.Context, *tunnel.Session) {}),
	})
	require.NoError(t, err)
	require.NoError(t, srv.Listen())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	t.Cleanup(func() { cancel(); require.NoError(t, <-done) })

	tok, err := joinapi.NewToken(ca.Cert)
	require.NoError(t, err)
	addr := srv.WebSocketAddr().(*net.TCPAddr).String()
	_, err = Join(context.Background(), Config{Cloud: addr, Token: tok.String(), Node: testNode, Dir: t.TempDir(), Timeout: 10 * time.Second})
	require.ErrorIs(t, err, ErrTunnelPort)
	require.ErrorContains(t, err, "download the cluster CA from "+addr+": join: the server asked for a client certificate, "+
		"which CloudCore's join endpoint never does: this is likely its tunnel port (10000); give --cloud CloudCore's join endpoint (its --join-addr, port 10002 by default)")
	require.ErrorContains(t, err, "tls: ", "the TLS refusal itself stays in the message")
}
