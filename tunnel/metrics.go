package tunnel

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tetheredge/tether/common/message"
)

// Metrics counts what the tunnel does and refuses. It is created per server
// or client and registered on the registerer its config names, if any.
type Metrics struct {
	// SessionsOpened counts established sessions by transport.
	SessionsOpened *prometheus.CounterVec
	// SessionsActive is the number of live sessions by transport.
	SessionsActive *prometheus.GaugeVec
	// Refused counts peers and frames refused, by transport and reason.
	Refused *prometheus.CounterVec
	// Messages counts envelopes by direction ("in" or "out") and kind
	// (message.Kind's names; "other" for a kind this build does not know,
	// so the cardinality is bounded). Sent envelopes are counted once
	// written.
	Messages *prometheus.CounterVec
	// DialFailures counts failed dial attempts by transport (client side).
	// An attempt cancelled because the other transport won its race is
	// not a failure.
	DialFailures *prometheus.CounterVec
	// DialRaces counts the dials that started a server's second transport
	// while the first was still pending (ClientConfig.RaceDelay), by the
	// transport that won ("none" when both failed). Client side.
	DialRaces *prometheus.CounterVec
	// Bytes counts frame bytes (length prefix included) by direction and
	// kind, as Messages.
	Bytes *prometheus.CounterVec
	// Resumptions counts TLS session tickets presented, by transport and
	// outcome: "resumed", "unknown" (not sealed by a current key) or
	// "not_authorized" (the node it was issued to is no longer accepted).
	// Declined tickets lead to a full handshake. Server side; the client
	// counts its resumed sessions only.
	Resumptions *prometheus.CounterVec
}

// Refusal reasons: a fixed set so that the metric's cardinality is bounded.
const (
	reasonTLS         = "tls_handshake"
	reasonCertificate = "certificate"
	reasonAuthorize   = "authorize"
	reasonHello       = "bad_hello"
	reasonVersion     = "protocol_version"
	reasonNodeName    = "node_mismatch"
	reasonTimeout     = "handshake_timeout"
	reasonFrame       = "bad_frame"
	reasonOverload    = "overload"
	// A classical full handshake after a declined ticket (server.go).
	reasonTicketDeclined = "ticket_declined"
	// Reasons of messages dropped alone, their QUIC large-message stream
	// reset while the session continues.
	reasonLargeTimeout = "large_message_timeout"
	reasonTooLarge     = "frame_too_large"
)

func newMetrics(reg prometheus.Registerer, side string) (*Metrics, error) {
	labels := prometheus.Labels{"side": side}
	m := &Metrics{
		SessionsOpened: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_tunnel_sessions_opened_total", Help: "Sessions established, by transport.", ConstLabels: labels,
		}, []string{"transport"}),
		SessionsActive: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "tether_tunnel_sessions_active", Help: "Live sessions, by transport.", ConstLabels: labels,
		}, []string{"transport"}),
		Refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_tunnel_refused_total", Help: "Peers, handshakes and frames refused, by transport and reason.", ConstLabels: labels,
		}, []string{"transport", "reason"}),
		Messages: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_tunnel_messages_total", Help: "Envelopes sent and received, by direction and kind.", ConstLabels: labels,
		}, []string{"direction", "kind"}),
		DialFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_tunnel_dial_failures_total", Help: "Failed dial attempts, by transport.", ConstLabels: labels,
		}, []string{"transport"}),
		DialRaces: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_tunnel_dial_races_total", Help: "Dials that raced a server's two transports, by winner.", ConstLabels: labels,
		}, []string{"winner"}),
		Bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_tunnel_bytes_total", Help: "Frame bytes sent and received, length prefixes included, by direction and kind.", ConstLabels: labels,
		}, []string{"direction", "kind"}),
		Resumptions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_tunnel_resumptions_total", Help: "TLS session tickets presented, by transport and outcome.", ConstLabels: labels,
		}, []string{"transport", "outcome"}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.SessionsOpened, m.SessionsActive, m.Refused, m.Messages, m.DialFailures, m.DialRaces, m.Bytes, m.Resumptions} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("register tunnel metrics: %w", err)
			}
		}
	}
	return m, nil
}

// kindOther is the kind label of envelopes of a kind this build does not
// know (the codec refuses them today; the label keeps the set bounded if
// that changes).
const kindOther = "other"

// kindCounters are one direction's message and byte counters of a
// session, resolved once per session: index 0 is kindOther, index k a
// known message.Kind k.
type kindCounters struct {
	msgs  []prometheus.Counter
	bytes []prometheus.Counter
}

// kindCounters resolves direction's counters for every known kind.
func (m *Metrics) kindCounters(direction string) kindCounters {
	var c kindCounters
	add := func(kind string) {
		c.msgs = append(c.msgs, m.Messages.WithLabelValues(direction, kind))
		c.bytes = append(c.bytes, m.Bytes.WithLabelValues(direction, kind))
	}
	add(kindOther)
	for k := message.Kind(1); k.Valid(); k++ {
		add(k.String())
	}
	return c
}

// add counts one envelope of kind and n frame bytes.
func (c kindCounters) add(kind message.Kind, n int) {
	i := int(kind)
	if !kind.Valid() || i >= len(c.msgs) {
		i = 0
	}
	c.msgs[i].Inc()
	c.bytes[i].Add(float64(n))
}
