package netproxy

import (
	"context"
	"errors"
	"net"
	"sync"
	"time"
)

// maxDatagram is the largest UDP payload forwarded.
const maxDatagram = 64 << 10

// chunkSize is the most a TCP read takes at once: a few segments, so that
// loss and delay act at about packet granularity.
const chunkSize = 16 << 10

// serveUDP relays datagrams: each client address gets its own socket to
// the target, so replies find their way back. A client's flow lives until
// the proxy closes.
func (p *Proxy) serveUDP(ctx context.Context, wg *sync.WaitGroup) {
	flows := map[string]chan<- chunk{}
	buf := make([]byte, maxDatagram)
	for {
		n, from, err := p.udp.ReadFrom(buf)
		if err != nil {
			return
		}
		up, ok := flows[from.String()]
		if !ok {
			if up, ok = p.openUDP(ctx, wg, from); !ok {
				continue
			}
			flows[from.String()] = up
		}
		p.offer(up, buf[:n])
	}
}

// openUDP dials the target for client and starts the flow's goroutines;
// it returns the queue of datagrams towards the target.
func (p *Proxy) openUDP(ctx context.Context, wg *sync.WaitGroup, client net.Addr) (chan<- chunk, bool) {
	back, err := net.Dial("udp", p.target)
	if err != nil || !p.track(ctx, back) {
		return nil, false
	}
	p.flows.Add(1)
	up := make(chan chunk, p.opts.Queue)
	down := make(chan chunk, p.opts.Queue)
	wg.Go(func() { p.udpLine(ctx, up, back.Write) })
	wg.Go(func() {
		p.udpLine(ctx, down, func(b []byte) (int, error) { return p.udp.WriteTo(b, client) })
	})
	wg.Go(func() {
		buf := make([]byte, maxDatagram)
		for {
			n, err := back.Read(buf)
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				continue // e.g. ECONNREFUSED while the target restarts
			}
			p.offer(down, buf[:n])
		}
	})
	return up, true
}

// offer queues a copy of a datagram, or drops it: lost, cut, or queue full.
func (p *Proxy) offer(q chan<- chunk, b []byte) {
	if cut, _ := p.gate(); cut || p.lost() {
		p.dropped.Add(1)
		return
	}
	select {
	case q <- chunk{data: append([]byte(nil), b...), at: time.Now().Add(time.Duration(p.delay.Load()))}:
	default:
		p.dropped.Add(1)
	}
}

// udpLine delivers queued datagrams when their delay has passed, dropping
// those that leave during a partition.
func (p *Proxy) udpLine(ctx context.Context, q <-chan chunk, write func([]byte) (int, error)) {
	for {
		select {
		case c := <-q:
			if !wait(ctx, c.at) {
				return
			}
			if cut, _ := p.gate(); cut {
				p.dropped.Add(1)
				continue
			}
			if _, err := write(c.data); err != nil && errors.Is(err, net.ErrClosed) {
				return
			}
			p.forwarded.Add(1)
		case <-ctx.Done():
			return
		}
	}
}

// serveTCP accepts connections and relays each to its own connection to
// the target.
func (p *Proxy) serveTCP(ctx context.Context, wg *sync.WaitGroup) {
	for {
		c, err := p.tcp.Accept()
		if err != nil {
			return
		}
		if !p.track(ctx, c) {
			return
		}
		p.flows.Add(1)
		wg.Go(func() { p.relay(ctx, c) })
	}
}

// relay connects front to the target once the path is up and copies both
// ways until either side ends; then it closes both.
func (p *Proxy) relay(ctx context.Context, front net.Conn) {
	defer p.untrack(front)
	// A connection made during a partition waits, as a SYN would be
	// retried, until the path heals or the client gives up.
	if !p.waitHealed(ctx) {
		return
	}
	var d net.Dialer
	back, err := d.DialContext(ctx, "tcp", p.target)
	if err != nil || !p.track(ctx, back) {
		return
	}
	defer p.untrack(back)
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	for _, dir := range [][2]net.Conn{{front, back}, {back, front}} {
		src, dst := dir[0], dir[1]
		q := make(chan chunk, p.opts.Queue)
		wg.Go(func() { p.readTCP(cctx, src, q) })
		wg.Go(func() {
			defer cancel()
			p.tcpLine(cctx, dst, q)
		})
	}
	<-cctx.Done()
	_ = front.Close()
	_ = back.Close()
	wg.Wait()
}

// readTCP reads src into the delay line; its end is queued too, so that a
// close crosses the path in order and not during a partition.
func (p *Proxy) readTCP(ctx context.Context, src net.Conn, q chan<- chunk) {
	buf := make([]byte, chunkSize)
	for {
		n, err := src.Read(buf)
		c := chunk{at: time.Now().Add(time.Duration(p.delay.Load()))}
		if err != nil {
			c.end = true
		} else {
			c.data, c.stall = append([]byte(nil), buf[:n]...), p.lost()
		}
		select {
		case q <- c:
		case <-ctx.Done():
			return
		}
		if c.end {
			return
		}
	}
}

// tcpLine writes queued chunks to dst after their delay, their stall and
// any partition; it returns at the direction's end or on an error.
func (p *Proxy) tcpLine(ctx context.Context, dst net.Conn, q <-chan chunk) {
	for {
		var c chunk
		select {
		case c = <-q:
		case <-ctx.Done():
			return
		}
		if !wait(ctx, c.at) {
			return
		}
		if c.stall {
			p.stalled.Add(1)
			if !wait(ctx, time.Now().Add(p.opts.StallTime)) {
				return
			}
		}
		if !p.waitHealed(ctx) || c.end {
			return
		}
		if _, err := dst.Write(c.data); err != nil {
			return
		}
		p.forwarded.Add(1)
	}
}
