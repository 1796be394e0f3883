package tunnel

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/common/message"
)

// TestMessagesCountedByKind: envelopes and their frame bytes are counted
// by kind on both sides and in both directions, on the control path and
// (QUIC) on a large message's own stream, and what one side counts as
// sent the other counts as received.
func TestMessagesCountedByKind(t *testing.T) {
	ca := newTestCA(t)
	srv := startServer(t, ca, echo, nil)
	for _, tr := range transports {
		t.Run(string(tr), func(t *testing.T) {
			c := newTestClient(t, ca, "edge-kind-"+string(tr), srv.addr(tr))
			ctx, sess := dialTest(t, c)
			server := func(dir, kind string) (msgs, bytes float64) {
				return testutil.ToFloat64(srv.metrics.Messages.WithLabelValues(dir, kind)),
					testutil.ToFloat64(srv.metrics.Bytes.WithLabelValues(dir, kind))
			}
			client := func(dir, kind string) (msgs, bytes float64) {
				return testutil.ToFloat64(c.metrics.Messages.WithLabelValues(dir, kind)),
					testutil.ToFloat64(c.metrics.Bytes.WithLabelValues(dir, kind))
			}
			// The server counts every session's envelopes: take its
			// figures before this one's.
			evIn0, evInBytes0 := server("in", "event")
			upIn0, upInBytes0 := server("in", "upstream")
			ackOut0, ackOutBytes0 := server("out", "ack")

			sizes := []int{0, 10, 100 << 10} // the last is a large message on QUIC
			for i, n := range sizes {
				require.NoError(t, sess.Send(ctx, &message.Message{ID: uint64(i + 1), Kind: message.KindEvent, Op: message.OpUpsert, Payload: make([]byte, n)}))
			}
			require.NoError(t, sess.Send(ctx, &message.Message{ID: 10, Kind: message.KindUpstream, Op: message.OpUpsert, Payload: []byte("status")}))
			for range len(sizes) + 1 {
				m, err := sess.Recv(ctx)
				require.NoError(t, err)
				require.Equal(t, message.KindAck, m.Kind)
			}

			evOut, evOutBytes := client("out", "event")
			upOut, upOutBytes := client("out", "upstream")
			require.Equal(t, float64(len(sizes)), evOut, "the client counts the events it sent")
			require.Equal(t, 1.0, upOut, "the client counts the upstream write it sent")
			require.Greater(t, evOutBytes, float64(100<<10), "the large event's bytes are counted")
			ackIn, ackInBytes := client("in", "ack")
			require.Equal(t, float64(len(sizes)+1), ackIn, "the client counts the acks it received")
			require.Zero(t, mustFirst(client("in", "event")), "nothing else is counted as an event")
			require.Zero(t, mustFirst(client("out", kindOther)))

			// The server received what the client sent, kind by kind.
			evIn, evInBytes := server("in", "event")
			require.Equal(t, evOut, evIn-evIn0)
			require.Equal(t, evOutBytes, evInBytes-evInBytes0)
			upIn, upInBytes := server("in", "upstream")
			require.Equal(t, upOut, upIn-upIn0)
			require.Equal(t, upOutBytes, upInBytes-upInBytes0)
			// The server counts a frame once written, which may be
			// after the client has read it.
			require.Eventually(t, func() bool {
				ackOut, ackOutBytes := server("out", "ack")
				return ackOut-ackOut0 == ackIn && ackOutBytes-ackOutBytes0 == ackInBytes
			}, 10*time.Second, 5*time.Millisecond, "the server counts the acks it sent as the client received them")
		})
	}
}

func mustFirst(a, _ float64) float64 { return a }

// bytesOut is the frame bytes m counted as sent, over every kind.
func bytesOut(m *Metrics) float64 {
	sum := testutil.ToFloat64(m.Bytes.WithLabelValues("out", kindOther))
	for k := message.Kind(1); k.Valid(); k++ {
		sum += testutil.ToFloat64(m.Bytes.WithLabelValues("out", k.String()))
	}
	return sum
}
