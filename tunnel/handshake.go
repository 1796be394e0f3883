package tunnel

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"github.com/tetheredge/tether/common/message"
)

// frameConn is the ordered frame channel of a connection before it becomes a
// session: enough to exchange the hello.
type frameConn interface {
	writeFrames(batch []byte) error
	readFrame() ([]byte, error)
	setDeadline(t time.Time) error
	// interrupt makes a blocked read or write fail at once. Unlike
	// setDeadline it may be called while another goroutine reads or writes.
	interrupt()
}

// RefusedError is returned by a client when the server refused the session,
// and carries the server's reason.
type RefusedError struct {
	Reason string
}

func (e *RefusedError) Error() string { return "tunnel: server refused session: " + e.Reason }

// refusal is a server-side handshake failure: what to count and tell the peer.
type refusal struct {
	reason string // metric reason
	err    error
}

func (r *refusal) Error() string { return r.err.Error() }
func (r *refusal) Unwrap() error { return r.err }

// clientHello sends the Hello and waits for the server's answer, until
// deadline or until ctx ends (a dial that lost its race is cancelled).
func clientHello(ctx context.Context, fc frameConn, c *message.Codec, node, agent string, deadline time.Time) (message.HelloAck, error) {
	var ack message.HelloAck
	if err := fc.setDeadline(deadline); err != nil {
		return ack, fmt.Errorf("set hello deadline: %w", err)
	}
	stop := context.AfterFunc(ctx, fc.interrupt)
	ack, err := exchangeHello(fc, c, node, agent)
	if !stop() { // interrupted, or being interrupted: the connection is spent
		return ack, fmt.Errorf("hello: %w", context.Cause(ctx))
	}
	if err != nil {
		return ack, err
	}
	if err := fc.setDeadline(time.Time{}); err != nil {
		return ack, fmt.Errorf("clear hello deadline: %w", err)
	}
	return ack, nil
}

func exchangeHello(fc frameConn, c *message.Codec, node, agent string) (message.HelloAck, error) {
	var ack message.HelloAck
	payload, err := c.Append(nil, &message.Hello{Version: message.ProtocolVersion, Node: node, Agent: agent})
	if err != nil {
		return ack, err
	}
	frame, err := c.AppendFrame(nil, &message.Message{Kind: message.KindHello, Node: node, Time: time.Now().UnixNano(), Payload: payload})
	if err != nil {
		return ack, err
	}
	if err := fc.writeFrames(frame); err != nil {
		return ack, fmt.Errorf("write hello: %w", err)
	}
	body, err := fc.readFrame()
	if err != nil {
		return ack, fmt.Errorf("read hello answer: %w", err)
	}
	var m message.Message
	if err := c.Unmarshal(body, &m); err != nil {
		return ack, fmt.Errorf("decode hello answer: %w", err)
	}
	switch m.Kind {
	case message.KindHelloAck:
		if err := c.UnmarshalValue(m.Payload, &ack); err != nil {
			return ack, fmt.Errorf("decode hello ack: %w", err)
		}
		if ack.Version != message.ProtocolVersion {
			return ack, fmt.Errorf("server chose protocol version %d, this client speaks %d", ack.Version, message.ProtocolVersion)
		}
	case message.KindRefuse:
		return ack, &RefusedError{Reason: string(m.Payload)}
	default:
		return ack, fmt.Errorf("server answered hello with %s", m.Kind)
	}
	return ack, nil
}

// serverHello reads and checks the client's Hello against its verified
// identity, and answers it. On refusal it tells the client why before
// returning a *refusal.
func serverHello(fc frameConn, c *message.Codec, peer Identity, sessionID string, deadline time.Time) (message.Hello, error) {
	var hello message.Hello
	if err := fc.setDeadline(deadline); err != nil {
		return hello, fmt.Errorf("set hello deadline: %w", err)
	}
	refuse := func(reason string, err error) (message.Hello, error) {
		frame, ferr := c.AppendFrame(nil, &message.Message{Kind: message.KindRefuse, Time: time.Now().UnixNano(), Payload: []byte(err.Error())})
		if ferr == nil {
			_ = fc.writeFrames(frame) // best effort: the peer may already be gone
		}
		return hello, &refusal{reason: reason, err: err}
	}
	body, err := fc.readFrame()
	if err != nil {
		var ne interface{ Timeout() bool }
		if errors.As(err, &ne) && ne.Timeout() {
			return hello, &refusal{reason: reasonTimeout, err: fmt.Errorf("no hello before the deadline: %w", err)}
		}
		return hello, &refusal{reason: reasonHello, err: fmt.Errorf("read hello: %w", err)}
	}
	var m message.Message
	if err := c.Unmarshal(body, &m); err != nil {
		return refuse(reasonHello, fmt.Errorf("decode hello: %w", err))
	}
	if m.Kind != message.KindHello {
		return refuse(reasonHello, fmt.Errorf("first message is %s, want hello", m.Kind))
	}
	if err := c.UnmarshalValue(m.Payload, &hello); err != nil {
		return refuse(reasonHello, fmt.Errorf("decode hello payload: %w", err))
	}
	if hello.Version != message.ProtocolVersion {
		return refuse(reasonVersion, fmt.Errorf("unsupported protocol version %d, server speaks %d", hello.Version, message.ProtocolVersion))
	}
	if err := hello.Validate(); err != nil {
		return refuse(reasonHello, err)
	}
	if hello.Node != peer.Node {
		return refuse(reasonNodeName, fmt.Errorf("hello claims node %q but the certificate is for %q", hello.Node, peer.Node))
	}
	payload, err := c.Append(nil, &message.HelloAck{Version: message.ProtocolVersion, Session: sessionID})
	if err != nil {
		return hello, err
	}
	frame, err := c.AppendFrame(nil, &message.Message{Kind: message.KindHelloAck, Node: peer.Node, Time: time.Now().UnixNano(), Payload: payload})
	if err != nil {
		return hello, err
	}
	if err := fc.writeFrames(frame); err != nil {
		return hello, fmt.Errorf("write hello ack: %w", err)
	}
	if err := fc.setDeadline(time.Time{}); err != nil {
		return hello, fmt.Errorf("clear hello deadline: %w", err)
	}
	return hello, nil
}

func newSessionID() string {
	var b [12]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails on Linux
	return hex.EncodeToString(b[:])
}
