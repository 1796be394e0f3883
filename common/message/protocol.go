// Package message defines the one envelope that crosses the tunnel between
// CloudCore and EdgeCore, its msgpack encoding and its framing.
//
// It is the single description of the Tether wire protocol (docs/protocol.md
// says the same for readers). It knows nothing of Kubernetes types, of QUIC or
// WebSocket, and of either side's logic: it only encodes, decodes and
// validates bytes.
//
// # Protocol version
//
// [ProtocolVersion] is carried in the [Hello] that opens every session. A
// server that does not speak the client's version refuses it with a
// [KindRefuse] message and closes the session.
//
// # Frame layout
//
// Every message is one frame, on every transport:
//
//	+------------------------+--------------------------------------+
//	| length: uint32, big    | body: msgpack array, `length` bytes  |
//	| endian, 1..MaxFrame    | (see Message for the element order)  |
//	+------------------------+--------------------------------------+
//
// On QUIC, frames follow one another on the control stream, and a frame
// larger than the large-message threshold (32 KiB) travels alone on a
// unidirectional stream of its own. On WebSocket each binary WebSocket
// message holds one or more complete frames, length prefixes included (the
// sender joins what is queued, up to 64 KiB, or MaxFrame+4 if smaller); a
// frame never spans two WebSocket messages and a message is never longer
// than MaxFrame+4 bytes.
//
// The length is checked against the configured maximum before anything is
// allocated, and the body is allocated as its bytes arrive. Before a body
// is decoded, every length it declares is checked against the bytes left
// ([ErrMalformed] otherwise), so decoding N bytes allocates at most a small
// multiple of N.
//
// A frame over the limit on an ordered path (the QUIC control stream, a
// WebSocket connection) ends the session: its bytes cannot be skipped
// without reading them. On a QUIC large-message stream it resets that
// stream only, and the sender's Send fails with [ErrFrameTooLarge]; so
// does a large message not complete within the receiver's deadline
// (tunnel.Options.LargeMessageTimeout).
//
// The body is a msgpack array whose elements are, in order, the fields of
// [Message]: id, kind, node, resource, version, op, reply_to, time, payload.
// The resource is itself a msgpack array: group, version, kind, namespace,
// name, uid. Decoders ignore trailing elements they do not know, so a later
// protocol version may append fields without breaking older peers.
//
// # Flow
//
//	client (EdgeCore)                         server (CloudCore)
//	   |-- TLS 1.3 handshake, client certificate ---->|  hook may refuse the peer
//	   |-- Hello{version, node, agent} -------------->|  checks version and node
//	   |<------------ HelloAck{version, session} -----|  or Refuse{reason}, close
//	   |<=========== Event / Ack / Upstream ========>|  both directions
//	   |<------------------------------ close(reason) |  either side
//
// A session ends with the transport's own close, which carries the reason:
// a QUIC CONNECTION_CLOSE with application error 0 (normal) or 1 (refused),
// or a WebSocket close frame with code 1000. The one exception is a
// cloud that moves an edge to another replica (rebalancing): it sends a
// [KindGoodbye] with a [Goodbye] hint, and the edge closes the session
// and connects again, to the hinted replica first:
//
//	|<----------------- Goodbye{reason, hint} -----|  replica over its fair share
//	|-- close("goodbye: ...") -------------------->|  edge dials the hint first
//
// The kind number was reserved in protocol version 1 from the start, so
// the version stays 1: an older edge that does not know it refuses it
// (reason unexpected_kind) and the session goes on, until the cloud closes
// it after a grace period; that edge then reconnects by its own list.
// Nothing is lost either way.
//
// Keepalive is the transport's own: QUIC PING frames and idle timeout,
// WebSocket ping/pong control frames; neither is an envelope kind.
package message

// ProtocolVersion is the version of the envelope and the session flow that
// this build speaks. It changes when a change is not backward compatible.
const ProtocolVersion uint16 = 1

// DefaultMaxFrame is the frame size limit used when a config leaves it zero.
const DefaultMaxFrame = 4 << 20

// Kind is the type of a frame. It is the second element of the body.
type Kind uint8

// Frame kinds. Values are part of the wire protocol: never renumber them.
const (
	// KindHello opens a session (client to server). Payload: a Hello.
	KindHello Kind = 1
	// KindHelloAck accepts a session (server to client). Payload: a HelloAck.
	KindHelloAck Kind = 2
	// KindRefuse refuses a session or a request. Payload: a UTF-8 reason.
	// ReplyTo names the refused message when there is one.
	KindRefuse Kind = 3
	// KindGoodbye asks the edge to end the session and reconnect,
	// preferring the replica it names (cloud to edge). Payload: a
	// Goodbye.
	KindGoodbye Kind = 4
	// KindEvent carries one object change (cloud to edge): Resource and
	// Version identify it, Op says what happened, Payload holds the object.
	KindEvent Kind = 5
	// KindAck confirms that the message with id ReplyTo is durably applied.
	KindAck Kind = 6
	// KindUpstream carries a write the edge asks the cloud to make on its
	// behalf (node status, lease, pod status). Op and Resource as for Event.
	KindUpstream Kind = 7
	// KindSync carries the state a peer holds so the other side can compute
	// what it is missing (reconcile after a disconnect). Payload is defined
	// by the sync protocol.
	KindSync Kind = 8
	// KindStreamOpen asks the peer to open a bulk-data stream on
	// WebSocket, where streams are extra connections (payload: a stream
	// token); on QUIC with ALPN tether/1a it announces a large-message
	// stream the sender has opened (no payload; tunnel/quic.go).
	KindStreamOpen Kind = 9
	// KindRenew asks the cloud for a credential over the live session,
	// answered by ReplyTo. With an empty Resource it renews the edge's
	// certificate: edge to cloud, payload is a PEM certificate request for
	// a new key; cloud to edge, the new certificate (PEM). With a
	// TokenResource it asks for a service-account token of one of the
	// node's pods (token.go): payload a TokenRequest, answered with a
	// Token. A refusal is a KindRefuse instead, a transient failure of a
	// token request a KindRetry.
	KindRenew Kind = 10
	// KindRetry answers a request that was not applied but may be later
	// (a transient API error, throttling): the sender keeps the message
	// and sends it again, not before the hint and with its own back-off.
	// ReplyTo names the message. Payload: a Retry. A KindRefuse answer,
	// by contrast, is final: the sender drops the message.
	KindRetry Kind = 11

	kindMax = KindRetry
)

// String returns the kind's name as used in logs and docs.
func (k Kind) String() string {
	switch k {
	case KindHello:
		return "hello"
	case KindHelloAck:
		return "hello_ack"
	case KindRefuse:
		return "refuse"
	case KindGoodbye:
		return "goodbye"
	case KindEvent:
		return "event"
	case KindAck:
		return "ack"
	case KindUpstream:
		return "upstream"
	case KindSync:
		return "sync"
	case KindStreamOpen:
		return "stream_open"
	case KindRenew:
		return "renew"
	case KindRetry:
		return "retry"
	default:
		return "unknown"
	}
}

// Valid reports whether k is a kind this build knows.
func (k Kind) Valid() bool { return k >= KindHello && k <= kindMax }

// Op is what happened to the object an Event or Upstream message names.
type Op uint8

// Operations. Values are part of the wire protocol: never renumber them.
const (
	// OpNone is for kinds that do not name an object operation.
	OpNone Op = 0
	// OpUpsert creates or replaces the object.
	OpUpsert Op = 1
	// OpDelete removes the object.
	OpDelete Op = 2
	// OpStatus replaces the object's status only.
	OpStatus Op = 3

	opMax = OpStatus
)

// String returns the operation's name as used in logs and docs.
func (o Op) String() string {
	switch o {
	case OpNone:
		return "none"
	case OpUpsert:
		return "upsert"
	case OpDelete:
		return "delete"
	case OpStatus:
		return "status"
	default:
		return "unknown"
	}
}
