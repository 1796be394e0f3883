package e2e

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/tests/testlog"
	"github.com/tetheredge/tether/tunnel"
)

// TestHostileEdge: an authenticated edge that sends malformed or hostile
// messages gets each refused (logged and counted) while a well-behaved
// edge on the same cloud keeps syncing, and nothing hostile is written.
func TestHostileEdge(t *testing.T) {
	env := cp.Env(t)
	cs := adminClient(t, env.Config)
	ns := env.Namespace(t)
	ctx := context.Background()
	createEdgeNode(t, cs, "edge-good")
	createEdgeNode(t, cs, "edge-evil")
	createPods(t, cs, ns, "good", "edge-good", 0, 5)
	c := startCloud(t, env.Config, cloudOptions{timings: testTimings})
	good := startEdge(t, c.admit(t, "edge-good"), dataDir(t, "edge-good"), c.addr, edgeOptions{timings: testTimings})
	waitConverged(t, c.cat, good.st, "edge-good", 6)

	// The hostile edge is on the whitelist: what it sends is the test.
	evil := c.admit(t, "edge-evil")
	client, err := tunnel.NewClient(tunnel.ClientConfig{
		Servers: []string{"quic://" + c.addr}, Node: "edge-evil", TLS: evil.tlsConfig(), Options: tunnel.Options{Logger: testlog.New()},
		Backoff: tunnel.Backoff{Min: 50 * time.Millisecond, Max: 500 * time.Millisecond},
	})
	require.NoError(t, err)
	sess, err := client.Dial(ctx)
	require.NoError(t, err)
	defer sess.Close("done")

	codec := message.NewCodec(0)
	syncPayload := func(s objsync.Sync) []byte {
		b, err := codec.Append(nil, &s)
		require.NoError(t, err)
		return b
	}
	hostile := []struct {
		name   string
		msg    *message.Message
		reason string // refusal counter label
	}{
		{"event from an edge", &message.Message{ID: 1, Kind: message.KindEvent, Op: message.OpUpsert, Resource: message.Resource{Kind: "Pod", Name: "x"}}, "unexpected_kind"},
		{"message naming another node", &message.Message{ID: 2, Kind: message.KindAck, Node: "edge-good", ReplyTo: 1}, "node_mismatch"},
		{"sync payload that is not msgpack", &message.Message{ID: 3, Kind: message.KindSync, Payload: []byte{0xc1, 0xc1}}, "bad_sync"},
		{"digest of 3 buckets", &message.Message{ID: 4, Kind: message.KindSync, Payload: syncPayload(objsync.Sync{Phase: objsync.PhaseDigest, Buckets: make([]uint64, 3)})}, "bad_sync"},
		{"prune from an edge", &message.Message{ID: 5, Kind: message.KindSync, Payload: syncPayload(objsync.Sync{Phase: objsync.PhasePrune, Hashes: []uint64{1}})}, "bad_sync"},
		{"upstream for another node's Node", &message.Message{ID: 6, Kind: message.KindUpstream, Op: message.OpUpsert, Resource: message.Resource{Version: "v1", Kind: "Node", Name: "edge-good"}, Payload: []byte(`{}`)}, "forbidden"},
		{"huge garbage upstream for its own Node", &message.Message{ID: 7, Kind: message.KindUpstream, Op: message.OpStatus, Resource: message.Resource{Version: "v1", Kind: "Node", Name: "edge-evil"}, Payload: bytes.Repeat([]byte{'x'}, 3<<20)}, "forbidden"},
		{"upstream for a Secret", &message.Message{ID: 8, Kind: message.KindUpstream, Op: message.OpUpsert, Resource: message.Resource{Version: "v1", Kind: "Secret", Namespace: ns, Name: "s"}, Payload: []byte(`{}`)}, "forbidden"},
		{"pod status for a pod not bound to it", &message.Message{ID: 9, Kind: message.KindUpstream, Op: message.OpStatus, Resource: message.Resource{Version: "v1", Kind: "Pod", Namespace: ns, Name: "good-0000"}, Payload: []byte(`{"phase":"Failed"}`)}, "forbidden"},
		{"delete of its own Node", &message.Message{ID: 10, Kind: message.KindUpstream, Op: message.OpDelete, Resource: message.Resource{Version: "v1", Kind: "Node", Name: "edge-evil"}, Payload: []byte(`{}`)}, "forbidden"},
	}
	for _, h := range hostile {
		before := c.counter(t, "tether_sync_refused_total", map[string]string{"reason": h.reason})
		require.NoError(t, sess.Send(ctx, h.msg), h.name)
		// Each refusal comes back to the sender, naming the message.
		var refusal *message.Message
		for refusal == nil {
			m, err := sess.Recv(ctx)
			require.NoError(t, err, h.name)
			if m.Kind == message.KindRefuse && m.ReplyTo == h.msg.ID {
				refusal = m
			}
		}
		require.NotEmpty(t, refusal.Payload, "%s: the refusal says why", h.name)
		require.Equal(t, before+1, c.counter(t, "tether_sync_refused_total", map[string]string{"reason": h.reason}), h.name)
	}

	// Nothing hostile was written.
	pod, err := cs.CoreV1().Pods(ns).Get(ctx, "good-0000", metav1.GetOptions{})
	require.NoError(t, err)
	require.NotEqual(t, "Failed", string(pod.Status.Phase))
	_, err = cs.CoreV1().Secrets(ns).Get(ctx, "s", metav1.GetOptions{})
	require.Error(t, err)

	// The well-behaved edge keeps syncing.
	pod.Labels["after"] = "storm"
	_, err = cs.CoreV1().Pods(ns).Update(ctx, pod, metav1.UpdateOptions{})
	require.NoError(t, err)
	// The catalog may not have seen the update yet, so converging to it
	// proves nothing: wait for the edge to hold the new label itself.
	require.Eventually(t, func() bool {
		got, ok, err := good.st.Get(ctx, objsync.Key{Kind: "Pod", Namespace: ns, Name: "good-0000"})
		return err == nil && ok && strings.Contains(string(got.Data), `"after":"storm"`)
	}, 30*time.Second, 20*time.Millisecond, "the well-behaved edge receives the update")

	// A message the tunnel cannot accept (unknown kind) ends only that
	// session.
	frame := &message.Message{Kind: message.Kind(200)}
	_ = sess.Send(ctx, frame) // refused by the encoder's peer: the server closes the session
	select {
	case <-sess.Done():
	case <-time.After(10 * time.Second):
		t.Fatalf("session with an unknown kind was not closed: %v", sess.Err())
	}
	waitConverged(t, c.cat, good.st, "edge-good", 6)
}
