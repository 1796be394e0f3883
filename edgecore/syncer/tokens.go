package syncer

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/tetheredge/tether/common/message"
)

// ErrRefused is wrapped by the error of a token request the cloud refused
// for good (the node may not have that token, or the API server said no).
var ErrRefused = errors.New("syncer: refused by the cloud")

// RetryError is the error of a token request the cloud could not answer
// now (the API server failed, the session is over its rate): ask again,
// not before After.
type RetryError struct {
	After  time.Duration
	Reason string
}

func (e *RetryError) Error() string {
	return fmt.Sprintf("syncer: the cloud asks to retry after %s: %s", e.After, e.Reason)
}

// RequestToken asks the cloud, over the live session, for a token of
// service account serviceAccount in namespace for the pod req names
// (docs/protocol.md, "Service-account tokens"). Without a session it
// fails with ErrOffline at once; a refusal wraps ErrRefused, a transient
// failure is a *RetryError. The token is a secret: it is never logged.
func (s *Syncer) RequestToken(ctx context.Context, namespace, serviceAccount string, req message.TokenRequest) (message.Token, error) {
	if err := req.Validate(); err != nil {
		return message.Token{}, fmt.Errorf("token request: %w", err)
	}
	payload, err := s.codec.Append(nil, &req)
	if err != nil {
		return message.Token{}, fmt.Errorf("encode token request: %w", err)
	}
	m, err := s.request(ctx, &message.Message{Kind: message.KindRenew, Resource: message.TokenResource(namespace, serviceAccount), Payload: payload})
	if err != nil {
		return message.Token{}, fmt.Errorf("token request: %w", err)
	}
	switch m.Kind {
	case message.KindRenew:
		var tok message.Token
		if err := s.codec.UnmarshalValue(m.Payload, &tok); err != nil {
			return message.Token{}, fmt.Errorf("decode token answer: %w", err)
		}
		if err := tok.Validate(); err != nil {
			return message.Token{}, fmt.Errorf("token answer: %w", err)
		}
		return tok, nil
	case message.KindRetry:
		var r message.Retry
		if err := s.codec.UnmarshalValue(m.Payload, &r); err != nil {
			return message.Token{}, fmt.Errorf("decode token retry: %w", err)
		}
		return message.Token{}, &RetryError{After: time.Duration(r.AfterMillis) * time.Millisecond, Reason: r.Reason}
	default:
		return message.Token{}, fmt.Errorf("token request: %w: %s", ErrRefused, reason(m.Payload))
	}
}
