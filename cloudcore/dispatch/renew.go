package dispatch

import (
	"context"
	"encoding/pem"
	"errors"

	"github.com/tetheredge/tether/common/message"
)

// renewal answers one session's certificate renewals, one at a time, off
// the receive path: a renewal waits on the API server. A request while
// one is being signed is refused (the edge asks again later).
type renewal struct {
	c     *conn
	queue chan *message.Message
}

func newRenewal(c *conn) *renewal {
	return &renewal{c: c, queue: make(chan *message.Message, 1)}
}

func (r *renewal) offer(ctx context.Context, m *message.Message) error {
	select {
	case r.queue <- m:
		return nil
	default:
		return r.c.refuse(ctx, m, "renew_busy", errors.New("a renewal of this node is in progress"))
	}
}

func (r *renewal) run(ctx context.Context) error {
	for {
		var m *message.Message
		select {
		case <-ctx.Done():
			return nil
		case m = <-r.queue:
		}
		if err := r.renew(ctx, m); err != nil {
			return err
		}
	}
}

// renew answers a certificate renewal over the session.
func (r *renewal) renew(ctx context.Context, m *message.Message) error {
	c := r.c
	if c.d.renewer == nil {
		return c.refuse(ctx, m, "renew_refused", errors.New("this cloud does not renew certificates"))
	}
	cert, err := c.d.renewer.Renew(ctx, c.node, c.s.Peer().Serial, m.Payload)
	if err != nil {
		return c.refuse(ctx, m, "renew_refused", err)
	}
	c.logger.Info("certificate renewed", "serial", cert.SerialNumber.Text(16), "not_after", cert.NotAfter)
	return c.answer(ctx, m, message.KindRenew, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}))
}
