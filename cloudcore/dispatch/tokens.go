package dispatch

import (
	"context"
	"errors"
	"fmt"

	"github.com/tetheredge/tether/common/message"
)

// errNoTokens refuses token requests on a dispatcher built without Tokens.
var errNoTokens = fmt.Errorf("%w: this cloud does not issue service-account tokens", ErrForbidden)

// apply makes one write the upstream handler took: an upstream message
// through Upstream, or a token request (a KindRenew naming a
// message.TokenResource) through Tokens, whose answer carries the token.
// Token requests share the session's upstream rate and queue: each is a
// write to the API server on the node's behalf.
func (u *upstreamHandler) apply(ctx context.Context, m *message.Message) ([]byte, error) {
	if m.Kind != message.KindRenew {
		return nil, u.c.d.upstream.Apply(ctx, u.c.node, m)
	}
	if u.c.d.tokens == nil {
		return nil, errNoTokens
	}
	payload, err := u.c.d.tokens.Token(ctx, u.c.node, m)
	if err == nil && len(payload) == 0 {
		return nil, errors.New("dispatch: token issuer answered nothing")
	}
	return payload, err
}
