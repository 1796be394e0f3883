// Package qmp is a small client of QEMU's machine protocol (QMP) over a
// unix socket: the commands the VM backend needs, each with a command id
// and the caller's deadline, and QEMU's events on a bounded channel that
// never holds up a reply.
//
// Why not github.com/digitalocean/go-qemu/qmp, the served client: its
// Run takes no context (a command whose reply never comes blocks its
// caller for ever), it sends no command ids (a late reply would answer the
// next command), it has no query-cpus-fast, and its event stream blocks
// the reader when nobody drains it. Those four are the whole job here, so
// this package is the few hundred lines that do them.
//
// The package speaks QMP only: it does not start, find or kill QEMU (that
// is edgecore/runtime/vm/qemu) and keeps no state besides one connection.
package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// ErrClosed is returned by Execute once the connection is closed, by
// Close or because QEMU went away.
var ErrClosed = errors.New("qmp: connection closed")

// Error is an error reply of QEMU: {"error": {"class": ..., "desc": ...}}.
type Error struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

func (e *Error) Error() string { return "qmp: " + e.Class + ": " + e.Desc }

// Event is one asynchronous QEMU event (SHUTDOWN, STOP, RESUME, RESET,
// POWERDOWN, ...). Data is the event's "data" member as sent (may be nil).
// At is QEMU's timestamp, zero when QEMU sent none.
type Event struct {
	Name string
	Data json.RawMessage
	At   time.Time
}

// DefaultEventBuffer is the number of events a Client keeps for a slow
// reader when Config.EventBuffer is zero.
const DefaultEventBuffer = 256

// Config tunes a Client. The zero value is ready to use.
type Config struct {
	// EventBuffer is how many undelivered events are kept; when it is
	// full the oldest is dropped (and counted, see Client.DroppedEvents).
	// Zero means DefaultEventBuffer.
	EventBuffer int
}

// Client is one QMP connection. It is safe for concurrent use: commands
// are written one at a time and their replies matched by id.
//
// Deadlines: a command whose reply has not come when its ctx ends fails
// with ctx's error; the connection STAYS USABLE. Its id is forgotten, so
// if the reply comes later it is recognised and dropped, and the next
// command gets its own reply. (QEMU answers in order, so a command behind
// one QEMU never answers waits as long; its own deadline bounds it too.)
// The connection is closed only by Close, by a read or write error, or by
// a line that is not QMP.
type Client struct {
	conn net.Conn

	writeMu sync.Mutex // one command on the wire at a time
	nextID  atomic.Uint64

	mu      sync.Mutex
	pending map[uint64]chan message
	closed  bool
	readErr error // why the reader stopped, once it has

	events  chan Event
	dropped atomic.Uint64
	late    atomic.Uint64

	done      chan struct{} // closed when the reader has returned
	closeOnce sync.Once
}

// Dial connects to QEMU's QMP socket at path, reads the greeting and
// negotiates capabilities (qmp_capabilities with none enabled), all
// within ctx.
func Dial(ctx context.Context, path string, cfg Config) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("dial qmp %s: %w", path, err)
	}
	c, err := newClient(ctx, conn, cfg)
	if err != nil {
		return nil, fmt.Errorf("start qmp session on %s: %w", path, err)
	}
	return c, nil
}

// newClient runs the handshake on conn and starts the reader. conn is
// closed on failure.
func newClient(ctx context.Context, conn net.Conn, cfg Config) (*Client, error) {
	if cfg.EventBuffer <= 0 {
		cfg.EventBuffer = DefaultEventBuffer
	}
	r := bufio.NewReaderSize(conn, 64<<10)
	// The greeting is read here, before the reader runs, with ctx's
	// deadline on the socket.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetReadDeadline(time.Unix(1, 0)) })
	line, err := readLine(r)
	stopped := stop()
	if err == nil {
		var m message
		if m, err = decode(line); err == nil && m.kind != kindGreeting {
			err = fmt.Errorf("%w: first message is not the greeting", errMalformed)
		}
	}
	if err != nil {
		_ = conn.Close()
		if !stopped && ctx.Err() != nil {
			return nil, fmt.Errorf("read greeting: %w", ctx.Err())
		}
		return nil, fmt.Errorf("read greeting: %w", err)
	}
	c := &Client{
		conn:    conn,
		pending: make(map[uint64]chan message),
		events:  make(chan Event, cfg.EventBuffer),
		done:    make(chan struct{}),
	}
	go c.read(r)
	if err := c.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		_ = c.Close()
		return nil, fmt.Errorf("negotiate capabilities: %w", err)
	}
	return c, nil
}

// readLine reads one message line, refusing one longer than maxLine.
func readLine(r *bufio.Reader) ([]byte, error) {
	var line []byte
	for {
		chunk, err := r.ReadSlice('\n')
		if len(line)+len(chunk) > maxLine {
			return nil, fmt.Errorf("%w: line longer than %d bytes", errMalformed, maxLine)
		}
		line = append(line, chunk...)
		if err == nil {
			return line, nil
		}
		if !errors.Is(err, bufio.ErrBufferFull) {
			return nil, err
		}
	}
}

// read is the one reader goroutine: replies go to their waiting command,
// events to the buffer. It returns when the connection fails or closes.
func (c *Client) read(r *bufio.Reader) {
	defer close(c.done)
	var err error
	for {
		var line []byte
		if line, err = readLine(r); err != nil {
			break
		}
		var m message
		if m, err = decode(line); err != nil {
			break
		}
		switch m.kind {
		case kindEvent:
			c.deliver(m.event)
		case kindReturn, kindError:
			c.mu.Lock()
			ch, ok := c.pending[m.id]
			delete(c.pending, m.id)
			c.mu.Unlock()
			if ok {
				ch <- m // buffered 1, and only this goroutine sends
			} else {
				c.late.Add(1)
			}
		case kindGreeting:
			err = fmt.Errorf("%w: a second greeting", errMalformed)
		}
		if err != nil {
			break
		}
	}
	c.mu.Lock()
	c.closed = true
	c.readErr = err
	for id, ch := range c.pending {
		close(ch)
		delete(c.pending, id)
	}
	c.mu.Unlock()
	_ = c.conn.Close()
	close(c.events)
}

// deliver queues ev without blocking: when the buffer is full the oldest
// queued event is dropped to make room.
func (c *Client) deliver(ev Event) {
	for {
		select {
		case c.events <- ev:
			return
		default:
		}
		select {
		case <-c.events:
			c.dropped.Add(1)
		default:
		}
	}
}

// Execute runs one command with optional arguments (marshalled to JSON;
// nil sends none) and decodes the reply's "return" into result (nil
// discards it). An error reply is a *Error. It returns ctx's error when
// ctx ends first (the connection stays usable, see Client), and ErrClosed
// (wrapped) when the connection is gone.
func (c *Client) Execute(ctx context.Context, command string, args, result any) error {
	id := c.nextID.Add(1)
	req := struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
		ID        uint64 `json:"id"`
	}{command, args, id}
	b, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("encode %s: %w", command, err)
	}
	b = append(b, '\n')

	ch := make(chan message, 1)
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return c.closedError(command)
	}
	c.pending[id] = ch
	c.mu.Unlock()

	if err := c.write(ctx, b); err != nil {
		c.forget(id)
		return fmt.Errorf("send %s: %w", command, err)
	}
	select {
	case m, ok := <-ch:
		if !ok {
			return c.closedError(command)
		}
		if m.kind == kindError {
			return fmt.Errorf("execute %s: %w", command, m.err)
		}
		if result == nil {
			return nil
		}
		if err := json.Unmarshal(m.ret, result); err != nil {
			return fmt.Errorf("decode %s reply: %w", command, err)
		}
		return nil
	case <-ctx.Done():
		c.forget(id)
		return fmt.Errorf("execute %s: %w", command, ctx.Err())
	}
}

// write sends one command line under ctx's deadline. A failed or partial
// write leaves the stream unusable, so it closes the connection.
func (c *Client) write(ctx context.Context, b []byte) error {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	if err := ctx.Err(); err != nil {
		return err
	}
	dl, ok := ctx.Deadline()
	if !ok {
		dl = time.Time{}
	}
	_ = c.conn.SetWriteDeadline(dl)
	if _, err := c.conn.Write(b); err != nil {
		_ = c.conn.Close() // the reader then fails every pending command
		return errors.Join(ErrClosed, err)
	}
	return nil
}

// forget drops a command that gave up; a late reply is then counted and
// dropped by the reader.
func (c *Client) forget(id uint64) {
	c.mu.Lock()
	delete(c.pending, id)
	c.mu.Unlock()
}

func (c *Client) closedError(command string) error {
	c.mu.Lock()
	why := c.readErr
	c.mu.Unlock()
	if why != nil && !errors.Is(why, net.ErrClosed) {
		return fmt.Errorf("execute %s: %w (%w)", command, ErrClosed, why)
	}
	return fmt.Errorf("execute %s: %w", command, ErrClosed)
}

// Events returns the event channel. It is closed when the connection
// closes. Events are kept while nobody reads (up to Config.EventBuffer,
// then the oldest are dropped), so a consumer that starts late still sees
// recent ones.
func (c *Client) Events() <-chan Event { return c.events }

// DroppedEvents counts events dropped because the buffer was full.
func (c *Client) DroppedEvents() uint64 { return c.dropped.Load() }

// LateReplies counts replies that came after their command gave up.
func (c *Client) LateReplies() uint64 { return c.late.Load() }

// Done is closed when the connection has closed and its reader returned.
func (c *Client) Done() <-chan struct{} { return c.done }

// Close closes the connection and waits for the reader goroutine.
// Pending commands fail with ErrClosed. It is idempotent and safe to call
// concurrently; it always returns nil (a socket's close error says
// nothing the caller can act on).
func (c *Client) Close() error {
	c.closeOnce.Do(func() { _ = c.conn.Close() })
	<-c.done
	return nil
}
