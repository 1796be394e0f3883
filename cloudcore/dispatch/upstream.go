package dispatch

import (
	"context"
	"errors"
	"time"

	"golang.org/x/time/rate"
	apierrors "k8s.io/apimachinery/pkg/api/errors"

	"github.com/tetheredge/tether/common/message"
)

// upstreamHandler makes one session's upstream writes, one at a time and
// in the order they arrived, on a lane (lane.go), and answers each with
// exactly one Ack, Refuse or Retry (docs/protocol.md, "Upstream
// answers"). The session's rate limit and queue bound what it may ask of
// the API server: over either, the write is answered with a Retry at once
// and never reaches Upstream.
type upstreamHandler struct {
	c     *conn
	lim   *rate.Limiter
	queue lane
}

func newUpstreamHandler(c *conn) *upstreamHandler {
	limit := rate.Limit(c.d.cfg.UpstreamQPS)
	if c.d.cfg.UpstreamQPS < 0 {
		limit = rate.Inf
	}
	u := &upstreamHandler{c: c, lim: rate.NewLimiter(limit, c.d.cfg.UpstreamBurst)}
	u.queue = lane{limit: c.d.cfg.UpstreamQueue, work: u.write}
	return u
}

// offer queues m for the writer, or answers it with a Retry when the
// session is over its rate or its queue is full. It never waits for the
// writer.
func (u *upstreamHandler) offer(ctx context.Context, m *message.Message) error {
	now := time.Now()
	r := u.lim.ReserveN(now, 1)
	if delay := r.DelayFrom(now); delay > 0 {
		r.CancelAt(now)
		u.c.d.metrics.upstream.WithLabelValues("throttled").Inc()
		if l := u.c.limited("upstream_throttled"); l != nil {
			l.Warn("upstream write throttled", "resource", m.Resource.String(), "retry_after", delay)
		}
		return u.c.retry(ctx, m, delay, "throttled")
	}
	queued, start := u.queue.push(m)
	if !queued {
		r.CancelAt(now) // not written: give its token back
		u.c.d.metrics.upstream.WithLabelValues("busy").Inc()
		if l := u.c.limited("upstream_busy"); l != nil {
			l.Warn("upstream write queue full", "resource", m.Resource.String())
		}
		return u.c.retry(ctx, m, 0, "busy")
	}
	if start {
		u.c.spawn(ctx, u.queue.run)
	}
	return nil
}

// write makes one upstream write (or token request, tokens.go) and
// answers it.
func (u *upstreamHandler) write(ctx context.Context, m *message.Message) error {
	payload, err := u.apply(ctx, m)
	if ctx.Err() != nil {
		return nil // the session is ending: no answer can reach the edge
	}
	return u.answer(ctx, m, payload, err)
}

// Upstream results, the label of tether_upstream_writes_total.
const (
	resultOK        = "ok"
	resultForbidden = "forbidden"
	resultRejected  = "rejected"
	resultRetry     = "retry"
)

// classify says how the Upstream error err is answered: its result label,
// the answer's kind, and for a Retry the delay the API server asked for.
// It is the one place that decides between retrying and giving up.
func classify(err error) (result string, kind message.Kind, after time.Duration) {
	switch {
	case err == nil:
		return resultOK, message.KindAck, 0
	case errors.Is(err, ErrForbidden):
		return resultForbidden, message.KindRefuse, 0
	case errors.Is(err, ErrRejected):
		return resultRejected, message.KindRefuse, 0
	}
	if s, ok := apierrors.SuggestsClientDelay(err); ok && s > 0 {
		after = time.Duration(s) * time.Second
	}
	return resultRetry, message.KindRetry, after
}

func (u *upstreamHandler) answer(ctx context.Context, m *message.Message, payload []byte, err error) error {
	c := u.c
	result, kind, after := classify(err)
	c.d.metrics.upstream.WithLabelValues(result).Inc()
	switch kind {
	case message.KindAck:
		if m.Kind == message.KindRenew { // a token request (tokens.go)
			return c.answer(ctx, m, message.KindRenew, payload)
		}
		return c.answer(ctx, m, message.KindAck, nil)
	case message.KindRefuse:
		return c.refuse(ctx, m, result, err)
	default:
		if l := c.limited("upstream_retry"); l != nil {
			l.Warn("upstream write failed, edge told to retry", "resource", m.Resource.String(), "retry_after", after, "err", err)
		}
		return c.retry(ctx, m, after, err.Error())
	}
}
