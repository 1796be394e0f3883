package tunnel

import (
	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/ratelog"
)

// Options are the settings shared by servers and clients. Every field's
// zero value means the default written beside it.
type Options struct {
	// MaxFrame is the largest frame accepted or sent, in bytes.
	// Default message.DefaultMaxFrame (4 MiB).
	MaxFrame int
	// KeepAlive is how often an idle connection proves it is alive.
	// Default 5s.
	KeepAlive time.Duration
	// DeadPeerTimeout is how long without hearing from the peer before the
	// session is declared dead: within half a KeepAlive of it on QUIC (see
	// quicIdleTimeout), exactly on WebSocket. Default 15s; it must exceed
	// KeepAlive.
	DeadPeerTimeout time.Duration
	// HandshakeTimeout bounds the TLS handshake plus the hello exchange.
	// Default 10s.
	HandshakeTimeout time.Duration
	// SendQueueBytes bounds the bytes a session queues for sending; Send
	// waits when it is full. Default 8 MiB; at least MaxFrame+4.
	SendQueueBytes int64
	// LargeMessage is the frame size above which a message travels on its
	// own QUIC stream instead of the ordered control stream. Default 32 KiB.
	LargeMessage int
	// LargeMessageTimeout bounds how long one large message may take to
	// arrive on its own QUIC stream, from the stream's arrival to its last
	// byte. A stream not complete by then is reset and counted
	// (tether_tunnel_refused_total{reason="large_message_timeout"}); the
	// session continues and the sender's Send fails. It must cover
	// MaxFrame at the slowest link served: 4 MiB at 1 Mbit/s takes 34 s.
	// Default 60s.
	LargeMessageTimeout time.Duration
	// PathMTUDiscovery turns on QUIC's path-MTU discovery (RFC 8899):
	// probes of growing size in each direction after the handshake, so that
	// bulk transfers use datagrams of up to 1,452 B instead of 1,280 B
	// (about 13% fewer packets). Off by default: on loopback the probes
	// cost 5.6 kB each way on every connection, more than a reconnect's
	// whole sync, for sessions that mostly carry small frames. Both ends
	// decide for themselves; an end that does not probe still receives
	// the larger datagrams of one that does.
	PathMTUDiscovery bool
	// RecvQueue is how many received messages wait for Recv before the
	// reader stops reading (and the transport's flow control pushes back).
	// Default 256.
	RecvQueue int
	// Logger receives the tunnel's logs. Default: discarded.
	Logger *slog.Logger
	// Registerer, when set, gets the tunnel's Prometheus metrics.
	Registerer prometheus.Registerer

	// unannounced, for tests, makes this end speak QUIC as versions
	// before alpnQUICAnnounced did: ALPN alpnQUIC alone, large-message
	// streams neither announced nor expected to be (quic.go).
	unannounced bool
}

// withDefaults returns a copy with defaults filled in, or an error for
// values that cannot work.
func (o Options) withDefaults() (Options, error) {
	if o.MaxFrame <= 0 {
		o.MaxFrame = message.DefaultMaxFrame
	}
	if o.KeepAlive <= 0 {
		o.KeepAlive = 5 * time.Second
	}
	if o.DeadPeerTimeout <= 0 {
		o.DeadPeerTimeout = 15 * time.Second
	}
	if o.DeadPeerTimeout <= o.KeepAlive {
		return o, fmt.Errorf("dead peer timeout %s must exceed keepalive %s", o.DeadPeerTimeout, o.KeepAlive)
	}
	if o.HandshakeTimeout <= 0 {
		o.HandshakeTimeout = 10 * time.Second
	}
	if o.SendQueueBytes <= 0 {
		o.SendQueueBytes = 8 << 20
	}
	if o.SendQueueBytes < int64(o.MaxFrame)+4 {
		return o, fmt.Errorf("send queue of %d bytes cannot hold one frame of %d", o.SendQueueBytes, o.MaxFrame)
	}
	if o.LargeMessage <= 0 {
		o.LargeMessage = 32 << 10
	}
	if o.RecvQueue <= 0 {
		o.RecvQueue = 256
	}
	if o.LargeMessageTimeout <= 0 {
		o.LargeMessageTimeout = 60 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return o, nil
}

func (o Options) sessionConfig(c *message.Codec, m *Metrics, logs *ratelog.Limiter) sessionConfig {
	return sessionConfig{
		codec:          c,
		sendQueueBytes: o.SendQueueBytes,
		largeThreshold: o.LargeMessage,
		largeTimeout:   o.LargeMessageTimeout,
		recvQueue:      o.RecvQueue,
		logger:         o.Logger,
		metrics:        m,
		in:             m.kindCounters("in"),
		out:            m.kindCounters("out"),
		logs:           logs,
	}
}
