package tunnel

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Dialling. Dial makes one pass over the configured servers, starting with
// the one that worked last. At a "host:port" server it races the two
// transports the way happy eyeballs (RFC 8305) races address families:
//
//	t=0          start the preferred transport (QUIC, or the one that worked last)
//	t=RaceDelay  still no session: start the other one beside it
//	             (at once if the first one failed before that)
//	first session established: cancel the other attempt, or close the
//	             session it established too ("lost the transport race")
//
// So where UDP is silently dropped an edge reaches the cloud over
// WebSocket about RaceDelay after it starts, not after QUIC's handshake
// timeout (DialTimeout), and where both work QUIC keeps the lead it is
// given. Every attempt the race starts has ended when Dial returns.

// Preferred returns the transport tried first at a server reachable by
// both: the one of the last session established, else ClientConfig.Prefer.
func (c *Client) Preferred() Transport {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pref
}

// Prefer sets the transport tried first at a server reachable by both
// (EdgeCore restores the one that worked before it restarted). Other
// values are ignored.
func (c *Client) Prefer(t Transport) {
	if t != TransportQUIC && t != TransportWebSocket {
		return
	}
	c.mu.Lock()
	c.pref = t
	c.mu.Unlock()
}

// Dial makes one pass over the servers, starting with the one that worked
// last, and returns the first session established. A refusal by a server
// (a *RefusedError) is returned at once: another address of the same cloud
// would refuse for the same reason.
func (c *Client) Dial(ctx context.Context) (*Session, error) {
	c.mu.Lock()
	first, pref := c.last, c.pref
	c.mu.Unlock()
	var errs []error
	for i := range c.servers {
		idx := (first + i) % len(c.servers)
		sess, err := c.dialServer(ctx, c.servers[idx], pref)
		if err == nil {
			c.mu.Lock()
			c.last, c.pref = idx, sess.Transport()
			c.mu.Unlock()
			return sess, nil
		}
		var refused *RefusedError
		if errors.As(err, &refused) || ctx.Err() != nil {
			return nil, err
		}
		errs = append(errs, err)
	}
	return nil, fmt.Errorf("dial cloud: %w", errors.Join(errs...))
}

// dialResult is the outcome of one attempt of a race.
type dialResult struct {
	transport Transport
	sess      *Session
	err       error
}

// dialServer establishes a session with one server, racing its transports
// when it has two, the preferred one first.
func (c *Client) dialServer(ctx context.Context, sv server, pref Transport) (*Session, error) {
	order := sv.transports
	if len(order) == 2 && order[0] != pref {
		order = []Transport{order[1], order[0]}
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	results := make(chan dialResult, len(order))
	next := 0 // order[next] is the next transport to start
	start := func() {
		ep := endpoint{order[next], sv.addr}
		next++
		go func() { // joined below: the loop receives one result per attempt started
			sess, err := c.dialEndpoint(ctx, ep)
			results <- dialResult{ep.transport, sess, err}
		}()
	}
	start()
	var raceTimer <-chan time.Time
	if next < len(order) && c.cfg.RaceDelay >= 0 {
		t := time.NewTimer(c.cfg.RaceDelay)
		defer t.Stop()
		raceTimer = t.C
	}
	var (
		won     *Session
		errs    []error
		refused error
		raced   bool // the second attempt started while the first was pending
	)
	for pending := 1; pending > 0; {
		select {
		case <-raceTimer:
			raceTimer = nil
			if won == nil && refused == nil && next < len(order) {
				raced = true
				start()
				pending++
				c.logger.Debug("racing transports", "addr", sv.addr, "second", string(order[next-1]), "after", c.cfg.RaceDelay)
			}
		case r := <-results:
			pending--
			switch {
			case r.err == nil && won == nil:
				won = r.sess
				cancel() // the other attempt lost
			case r.err == nil:
				_ = r.sess.Close("lost the transport race")
			case won != nil, refused != nil:
				// Cancelled because the other transport won or was
				// refused: not a failure of its own.
			default:
				c.metrics.DialFailures.WithLabelValues(string(r.transport)).Inc()
				c.logger.Debug("dial failed", "transport", string(r.transport), "addr", sv.addr, "err", r.err)
				var re *RefusedError
				if errors.As(r.err, &re) && refused == nil {
					refused = r.err
					cancel() // the other transport would be refused the same way
				}
				errs = append(errs, fmt.Errorf("%s %s: %w", r.transport, sv.addr, r.err))
				if refused == nil && ctx.Err() == nil && next < len(order) {
					raceTimer = nil
					start()
					pending++
				}
			}
		}
	}
	if raced {
		winner := "none"
		if won != nil {
			winner = string(won.Transport())
		}
		c.metrics.DialRaces.WithLabelValues(winner).Inc()
	}
	switch {
	case won != nil:
		return won, nil
	case refused != nil:
		return nil, refused
	}
	return nil, errors.Join(errs...)
}

// dialEndpoint makes one attempt on one transport, bounded by DialTimeout.
func (c *Client) dialEndpoint(ctx context.Context, ep endpoint) (*Session, error) {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.DialTimeout)
	defer cancel()
	deadline, _ := ctx.Deadline()
	dial := c.dialWebSocket
	if ep.transport == TransportQUIC {
		dial = c.dialQUIC
	}
	tickets, name := c.tickets[ep.transport], c.serverName(ep.addr)
	offered, _ := tickets.Get(name)
	sess, err := dial(ctx, ep, deadline)
	switch {
	case err != nil && serverAnswered(err):
		// The server refused this handshake: the ticket offered, if any,
		// goes, so that the next attempt is a full handshake.
		tickets.dropAnswered(name)
	case err == nil && offered != nil && !sess.Resumed():
		// The server declined the ticket (a client whose TLS config
		// names its own curves completes a full handshake then).
		tickets.drop(name, offered)
	}
	return sess, err
}
