package message

import (
	"errors"
	"fmt"
	"unicode/utf8"
)

// Message is the envelope of everything that crosses the tunnel. Its fields
// are encoded as a msgpack array in the order they are declared here.
type Message struct {
	_struct bool `codec:",toarray"` //nolint:unused // tells the codec to encode as an array

	// ID is the sender's id for this message; zero for messages that are
	// never answered. The cloud's ids strictly increase within a session,
	// across resends (a resend gets a new id) and reconciles, so the edge
	// can tell a stale event for a key from a newer one. The edge's
	// upstream ids are its outbox sequence numbers: they only grow, and a
	// write sent again keeps its id.
	ID uint64
	// Kind is the frame type.
	Kind Kind
	// Node is the edge node the message is about or from. The receiver
	// checks it against the authenticated peer; it is never trusted alone.
	Node string
	// Resource identifies the object an Event or Upstream is about.
	Resource Resource
	// Version is the object's version (Kubernetes resourceVersion). It is
	// opaque: compare it for equality only.
	Version string
	// Op is what happened to the object.
	Op Op
	// ReplyTo is the ID of the message this one answers (acks, refusals).
	ReplyTo uint64
	// Time is when the sender created the message, Unix nanoseconds.
	Time int64
	// Payload is the kind-specific body.
	Payload []byte
}

// Resource identifies one Kubernetes object.
type Resource struct {
	_struct bool `codec:",toarray"` //nolint:unused // tells the codec to encode as an array

	Group     string
	Version   string
	Kind      string
	Namespace string
	Name      string
	UID       string
}

// String returns group/version/kind namespace/name for logs.
func (r Resource) String() string {
	gv := r.Version
	if r.Group != "" {
		gv = r.Group + "/" + r.Version
	}
	if r.Namespace == "" {
		return gv + "/" + r.Kind + " " + r.Name
	}
	return gv + "/" + r.Kind + " " + r.Namespace + "/" + r.Name
}

// Hello is the payload of KindHello.
type Hello struct {
	_struct bool `codec:",toarray"` //nolint:unused // tells the codec to encode as an array

	// Version is the protocol version the client speaks.
	Version uint16
	// Node is the node name the client claims; it must match its certificate.
	Node string
	// Agent names the client software and version, for logs.
	Agent string
}

// HelloAck is the payload of KindHelloAck.
type HelloAck struct {
	_struct bool `codec:",toarray"` //nolint:unused // tells the codec to encode as an array

	// Version is the protocol version the session uses.
	Version uint16
	// Session is an opaque id the server gave this session.
	Session string
}

// Retry is the payload of KindRetry.
type Retry struct {
	_struct bool `codec:",toarray"` //nolint:unused // tells the codec to encode as an array
	// AfterMillis is the least time to wait before sending again, in
	// milliseconds; zero means the sender's own back-off alone.
	AfterMillis uint32
	// Reason says why, for logs (bounded like a refusal's reason).
	Reason string
}

// Goodbye is the payload of KindGoodbye: the cloud asks the edge to end
// the session and connect again, to Hint first when it is one of the
// edge's own cloud addresses.
type Goodbye struct {
	_struct bool `codec:",toarray"` //nolint:unused // tells the codec to encode as an array
	// Reason says why, for logs.
	Reason string
	// Hint is the address ("host:port", "quic://host:port" or
	// "wss://host:port") of a less loaded CloudCore replica; empty: none.
	Hint string
}

// Validate checks a Goodbye's fields: bounded, valid UTF-8.
func (g *Goodbye) Validate() error {
	if len(g.Reason) > maxNameLen || !utf8.ValidString(g.Reason) {
		return fmt.Errorf("%w: goodbye reason too long or not UTF-8", ErrInvalid)
	}
	if len(g.Hint) > maxNameLen || !utf8.ValidString(g.Hint) {
		return fmt.Errorf("%w: goodbye hint too long or not UTF-8", ErrInvalid)
	}
	return nil
}

// Field limits. They follow Kubernetes' own limits (DNS subdomain names of
// 253 bytes, labels of 63) with room for resource versions and UIDs.
const (
	maxNameLen    = 253
	maxLabelLen   = 63
	maxUIDLen     = 128
	maxVersionLen = 128
)

// ErrInvalid is wrapped by every validation error.
var ErrInvalid = errors.New("message: invalid")

// Validate checks the envelope's fields against the protocol: a known kind
// and operation, and bounded, valid UTF-8 identity strings. It does not look
// into the payload.
func (m *Message) Validate() error {
	if !m.Kind.Valid() {
		return fmt.Errorf("%w: unknown kind %d", ErrInvalid, m.Kind)
	}
	if m.Op > opMax {
		return fmt.Errorf("%w: unknown op %d", ErrInvalid, m.Op)
	}
	if (m.Kind == KindEvent || m.Kind == KindUpstream) && m.Op == OpNone {
		return fmt.Errorf("%w: %s without op", ErrInvalid, m.Kind)
	}
	checks := []struct {
		field string
		value string
		max   int
	}{
		{"node", m.Node, maxNameLen},
		{"version", m.Version, maxVersionLen},
		{"resource.group", m.Resource.Group, maxNameLen},
		{"resource.version", m.Resource.Version, maxLabelLen},
		{"resource.kind", m.Resource.Kind, maxLabelLen},
		{"resource.namespace", m.Resource.Namespace, maxLabelLen},
		{"resource.name", m.Resource.Name, maxNameLen},
		{"resource.uid", m.Resource.UID, maxUIDLen},
	}
	for _, c := range checks {
		if len(c.value) > c.max {
			return fmt.Errorf("%w: %s is %d bytes, limit %d", ErrInvalid, c.field, len(c.value), c.max)
		}
		if !utf8.ValidString(c.value) {
			return fmt.Errorf("%w: %s is not valid UTF-8", ErrInvalid, c.field)
		}
	}
	return nil
}

// Validate checks a Hello's fields.
func (h *Hello) Validate() error {
	if h.Node == "" || len(h.Node) > maxNameLen || !utf8.ValidString(h.Node) {
		return fmt.Errorf("%w: hello node name %q", ErrInvalid, truncate(h.Node))
	}
	if len(h.Agent) > maxNameLen || !utf8.ValidString(h.Agent) {
		return fmt.Errorf("%w: hello agent too long or not UTF-8", ErrInvalid)
	}
	return nil
}

func truncate(s string) string {
	if len(s) > 64 {
		return s[:64] + "..."
	}
	return s
}
