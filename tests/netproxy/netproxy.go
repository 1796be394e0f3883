// Package netproxy is a forwarding proxy on loopback for tests that need a
// bad network without tc netem: it relays UDP datagrams (QUIC) or TCP
// connections (WebSocket) to one target and can drop, delay and cut them.
//
// The faults follow what each transport would see on a real path:
//
//   - UDP: each datagram is lost with probability Loss, independently in each
//     direction, and delivered Delay after it arrived; during a partition
//     every datagram is dropped.
//   - TCP: bytes cannot be dropped without breaking the stream, so each chunk
//     read is delayed by Delay and, with probability Loss, stalls its
//     direction for StallTime more (what a retransmission costs); during a
//     partition nothing moves (data, closes and new connections wait) and
//     both ends see a silent peer until it heals.
//
// A flap is a short partition: call Partition(true) and Partition(false).
// The proxy is for tests only; it must not be used by the product.
package netproxy

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Options configure a Proxy. Zero values mean the defaults beside each field.
type Options struct {
	// Network is "udp" or "tcp". Default "udp".
	Network string
	// Listen is the address the proxy accepts on. Default "127.0.0.1:0".
	Listen string
	// StallTime is how long a lost TCP chunk holds its direction. Default
	// 200ms (Linux's minimum retransmission timeout).
	StallTime time.Duration
	// Queue bounds the datagrams or chunks waiting in each direction of a
	// flow; a full UDP queue drops, a full TCP queue pushes back on the
	// sender. Default 4096.
	Queue int
}

// Stats counts what the proxy did since it started.
type Stats struct {
	// Forwarded and Dropped count UDP datagrams; Forwarded also counts TCP
	// chunks.
	Forwarded, Dropped int64
	// Stalled counts TCP chunks "lost" (held for StallTime).
	Stalled int64
	// Flows counts UDP clients seen and TCP connections accepted.
	Flows int64
}

// Proxy forwards to one target. Its methods are safe for concurrent use.
type Proxy struct {
	target string
	opts   Options
	udp    net.PacketConn // one of udp and tcp is set
	tcp    net.Listener

	loss  atomic.Uint64 // math.Float64bits of the loss probability
	delay atomic.Int64  // time.Duration

	mu     sync.Mutex
	healed chan struct{} // closed while not partitioned; replaced when a partition starts
	cut    bool
	closed bool
	conns  map[net.Conn]struct{}
	cancel context.CancelFunc // of the running Run
	done   chan struct{}      // closed when Run returns

	forwarded, dropped, stalled, flows atomic.Int64
}

// New binds the proxy's address; Run forwards. Close releases it.
func New(target string, opts Options) (*Proxy, error) {
	if opts.Network == "" {
		opts.Network = "udp"
	}
	if opts.Listen == "" {
		opts.Listen = "127.0.0.1:0"
	}
	if opts.StallTime <= 0 {
		opts.StallTime = 200 * time.Millisecond
	}
	if opts.Queue <= 0 {
		opts.Queue = 4096
	}
	p := &Proxy{target: target, opts: opts, healed: make(chan struct{}), conns: map[net.Conn]struct{}{}}
	close(p.healed)
	var err error
	switch opts.Network {
	case "udp":
		p.udp, err = net.ListenPacket("udp", opts.Listen)
	case "tcp":
		p.tcp, err = net.Listen("tcp", opts.Listen)
	default:
		return nil, fmt.Errorf("netproxy: network %q: want udp or tcp", opts.Network)
	}
	if err != nil {
		return nil, fmt.Errorf("netproxy: listen: %w", err)
	}
	return p, nil
}

// Start is New and Run for a test: the proxy runs until the test ends.
func Start(tb testing.TB, target string, opts Options) *Proxy {
	tb.Helper()
	p, err := New(target, opts)
	if err != nil {
		tb.Fatal(err)
	}
	ctx, err := p.begin(context.Background())
	if err != nil {
		tb.Fatal(err)
	}
	go p.serve(ctx)
	tb.Cleanup(func() { _ = p.Close() })
	return p
}

// Addr is the address clients dial instead of the target.
func (p *Proxy) Addr() net.Addr {
	if p.udp != nil {
		return p.udp.LocalAddr()
	}
	return p.tcp.Addr()
}

// SetLoss sets the probability, from 0 to 1, that a datagram is lost (UDP)
// or a chunk stalls (TCP).
func (p *Proxy) SetLoss(prob float64) {
	p.loss.Store(uint64(max(0, min(1, prob)) * (1 << 32)))
}

func (p *Proxy) lost() bool {
	l := p.loss.Load()
	return l > 0 && rand.Uint64N(1<<32) < l
}

// SetDelay sets the one-way delay added to every datagram or chunk.
func (p *Proxy) SetDelay(d time.Duration) { p.delay.Store(int64(max(0, d))) }

// Partition cuts (on) or heals (off) the path in both directions.
func (p *Proxy) Partition(on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if on == p.cut {
		return
	}
	p.cut = on
	if on {
		p.healed = make(chan struct{})
	} else {
		close(p.healed)
	}
}

// gate returns whether the path is cut and a channel closed when it heals.
func (p *Proxy) gate() (bool, <-chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cut, p.healed
}

// Stats returns the counters.
func (p *Proxy) Stats() Stats {
	return Stats{Forwarded: p.forwarded.Load(), Dropped: p.dropped.Load(), Stalled: p.stalled.Load(), Flows: p.flows.Load()}
}

// Run forwards until ctx ends or Close is called, then closes every flow
// and returns once all its goroutines have. It returns nil unless the
// proxy was already closed or running.
func (p *Proxy) Run(ctx context.Context) error {
	ctx, err := p.begin(ctx)
	if err != nil {
		return err
	}
	p.serve(ctx)
	return nil
}

// begin marks the proxy running and returns the context serve runs under.
func (p *Proxy) begin(ctx context.Context) (context.Context, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || p.done != nil {
		return nil, errors.New("netproxy: closed or already running")
	}
	ctx, p.cancel = context.WithCancel(ctx)
	p.done = make(chan struct{})
	return ctx, nil
}

// serve forwards until ctx ends, then joins every goroutine.
func (p *Proxy) serve(ctx context.Context) {
	defer close(p.done)
	defer p.cancel()
	var wg sync.WaitGroup
	wg.Go(func() {
		<-ctx.Done()
		p.closeAll()
	})
	if p.udp != nil {
		p.serveUDP(ctx, &wg)
	} else {
		p.serveTCP(ctx, &wg)
	}
	p.cancel()
	wg.Wait()
}

// Close stops the proxy and waits for Run to return. It is idempotent.
func (p *Proxy) Close() error {
	p.mu.Lock()
	p.closed = true
	cancel, done := p.cancel, p.done
	p.mu.Unlock()
	if cancel == nil {
		p.closeAll()
		return nil
	}
	cancel()
	<-done
	return nil
}

// closeAll closes the listening socket and every tracked connection.
func (p *Proxy) closeAll() {
	if p.udp != nil {
		_ = p.udp.Close()
	} else {
		_ = p.tcp.Close()
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.conns {
		_ = c.Close()
	}
	clear(p.conns)
}

// track registers c to be closed by closeAll; false if the proxy is
// already closing (c is then closed).
func (p *Proxy) track(ctx context.Context, c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if ctx.Err() != nil {
		_ = c.Close()
		return false
	}
	p.conns[c] = struct{}{}
	return true
}

func (p *Proxy) untrack(c net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.conns, c)
	_ = c.Close()
}

// chunk is a datagram or a piece of a stream in a delay line. end marks the
// end of a TCP direction.
type chunk struct {
	data  []byte
	at    time.Time // when it may leave
	stall bool
	end   bool
}

// wait blocks until t or ctx's end; false on ctx's end.
func wait(ctx context.Context, t time.Time) bool {
	d := time.Until(t)
	if d <= 0 {
		return ctx.Err() == nil
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// waitHealed blocks while the path is cut; false on ctx's end.
func (p *Proxy) waitHealed(ctx context.Context) bool {
	for {
		cut, healed := p.gate()
		if !cut {
			return ctx.Err() == nil
		}
		select {
		case <-healed:
		case <-ctx.Done():
			return false
		}
	}
}
