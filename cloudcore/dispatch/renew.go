package dispatch

import (
	"context"
	"encoding/pem"
	"errors"

	"github.com/tetheredge/tether/common/message"
)

// renewal answers one session's certificate renewals, one at a time, off
// the receive path (a renewal waits on the API server), on a lane
// (lane.go). One request may wait while another is being signed; one
// more is refused (the edge asks again later).
type renewal struct {
	c     *conn
	queue lane
}

func newRenewal(c *conn) *renewal {
	r := &renewal{c: c}
	r.queue = lane{limit: 1, work: r.renew}
	return r
}

func (r *renewal) offer(ctx context.Context, m *message.Message) error {
	queued, start := r.queue.push(m)
	if !queued {
		return r.c.refuse(ctx, m, "renew_busy", errors.New("a renewal of this node is in progress"))
	}
	if start {
		r.c.spawn(ctx, r.queue.run)
	}
	return nil
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
	c.log().Info("certificate renewed", "serial", cert.SerialNumber.Text(16), "not_after", cert.NotAfter)
	return c.answer(ctx, m, message.KindRenew, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}))
}
