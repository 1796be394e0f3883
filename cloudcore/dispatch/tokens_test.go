package dispatch

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/tunnel"
)

// TestServeTokenRequestWithoutIssuer: a token request to a cloud without
// a token issuer is refused, by reply_to, and the session goes on (an
// upstream write after it is answered).
func TestServeTokenRequestWithoutIssuer(t *testing.T) {
	r := newRig(t, Config{}, &fakeUpstream{}, nil, tunnel.Options{})
	payload, err := message.NewCodec(0).Append(nil, &message.TokenRequest{Pod: "web", PodUID: "uid-1", ExpirationSeconds: 3607})
	require.NoError(t, err)
	id := r.send(t, &message.Message{Kind: message.KindRenew, Resource: message.TokenResource("ns", "app"), Payload: payload})
	m := r.recv(t)
	require.Equal(t, message.KindRefuse, m.Kind)
	require.Equal(t, id, m.ReplyTo)
	require.Contains(t, string(m.Payload), "does not issue service-account tokens")
	up := r.upstream(t, "edge-1")
	m = r.recv(t)
	require.Equal(t, up, m.ReplyTo, "the session goes on")
}
