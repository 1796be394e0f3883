package message

import (
	"fmt"
	"unicode/utf8"
)

// Service-account tokens for the pods of an edge travel as a sub-kind of
// KindRenew: a credential the edge asks the cloud for over its live
// session, answered by reply_to like a certificate renewal. A renew whose
// Resource is a TokenResource asks for a token; one with an empty
// Resource is a certificate renewal (payload: a PEM request).
//
//	edge                                              cloud
//	 |-- renew{id, resource=TokenRequest ns/sa,        |  pod bound to the node? uid and
//	 |         payload=TokenRequest} ----------------->|  serviceAccountName match?
//	 |                                                 |  CreateToken bound to the pod
//	 |<-------- renew{reply_to=id, payload=Token} -----|  or refuse{reason} (final),
//	 |                                                 |  or retry{after, reason}
//
// A cloud that predates tokens takes the request for a certificate
// renewal whose payload is no PEM request and refuses it: the session
// goes on, the edge's pod waits. An old edge never sends one.

// Token requests name this resource kind (authentication.k8s.io/v1
// TokenRequest, the subresource serviceaccounts/token), in the namespace
// of the service account, with the service account's name.
const (
	TokenGroup   = "authentication.k8s.io"
	TokenVersion = "v1"
	TokenKind    = "TokenRequest"
)

// Bounds of a token request and answer. Kubernetes bounds neither
// audiences nor tokens; these are far above what a pod asks for (one or two
// audiences, a JWT of about 1 KiB).
const (
	maxAudiences   = 32
	maxAudienceLen = 512
	maxTokenLen    = 16 << 10
	// MaxTokenExpirationSeconds is the API server's own bound on
	// expirationSeconds (2^32 s).
	MaxTokenExpirationSeconds = 1 << 32
)

// TokenResource is the Resource of a request for a token of service
// account name in namespace.
func TokenResource(namespace, name string) Resource {
	return Resource{Group: TokenGroup, Version: TokenVersion, Kind: TokenKind, Namespace: namespace, Name: name}
}

// IsTokenRequest reports whether m asks for a service-account token (a
// KindRenew naming a TokenResource) rather than a certificate.
func IsTokenRequest(m *Message) bool {
	return m.Kind == KindRenew && m.Resource.Group == TokenGroup && m.Resource.Kind == TokenKind
}

// TokenRequest is the payload of a token request: for which pod, for
// which audiences, for how long. The service account and its namespace
// are the message's Resource.
type TokenRequest struct {
	_struct bool `codec:",toarray"` //nolint:unused // tells the codec to encode as an array

	// Pod and PodUID name the pod the token is bound to.
	Pod    string
	PodUID string
	// Audiences are the token's intended audiences; none means the API
	// server's own.
	Audiences []string
	// ExpirationSeconds is the lifetime asked for (the projection's).
	ExpirationSeconds int64
}

// Validate checks a TokenRequest's fields: a pod name and uid, bounded
// valid UTF-8 audiences, and a lifetime the API server could grant.
func (r *TokenRequest) Validate() error {
	if r.Pod == "" || len(r.Pod) > maxNameLen || !utf8.ValidString(r.Pod) {
		return fmt.Errorf("%w: token request pod name %q", ErrInvalid, truncate(r.Pod))
	}
	if r.PodUID == "" || len(r.PodUID) > maxUIDLen || !utf8.ValidString(r.PodUID) {
		return fmt.Errorf("%w: token request pod uid %q", ErrInvalid, truncate(r.PodUID))
	}
	if len(r.Audiences) > maxAudiences {
		return fmt.Errorf("%w: token request has %d audiences, limit %d", ErrInvalid, len(r.Audiences), maxAudiences)
	}
	for _, a := range r.Audiences {
		if a == "" || len(a) > maxAudienceLen || !utf8.ValidString(a) {
			return fmt.Errorf("%w: token request audience %q", ErrInvalid, truncate(a))
		}
	}
	if r.ExpirationSeconds <= 0 || r.ExpirationSeconds > MaxTokenExpirationSeconds {
		return fmt.Errorf("%w: token request expirationSeconds %d out of range", ErrInvalid, r.ExpirationSeconds)
	}
	return nil
}

// Token is the payload of the answer to a token request.
type Token struct {
	_struct bool `codec:",toarray"` //nolint:unused // tells the codec to encode as an array

	// Token is the signed token (a JWT). It is a secret: never log it.
	Token string
	// ExpiresUnix is when it expires, Unix seconds (the TokenRequest's
	// status.expirationTimestamp).
	ExpiresUnix int64
	// ExpirationSeconds is the lifetime the API server granted (the
	// TokenRequest's spec.expirationSeconds as answered): the token was
	// issued ExpirationSeconds before ExpiresUnix.
	ExpirationSeconds int64
}

// Validate checks a Token's fields: a token of bounded size, an expiry,
// and a lifetime in range.
func (t *Token) Validate() error {
	if t.Token == "" || len(t.Token) > maxTokenLen || !utf8.ValidString(t.Token) {
		return fmt.Errorf("%w: token of %d bytes", ErrInvalid, len(t.Token))
	}
	if t.ExpiresUnix <= 0 {
		return fmt.Errorf("%w: token expiry %d", ErrInvalid, t.ExpiresUnix)
	}
	if t.ExpirationSeconds <= 0 || t.ExpirationSeconds > MaxTokenExpirationSeconds {
		return fmt.Errorf("%w: token expirationSeconds %d out of range", ErrInvalid, t.ExpirationSeconds)
	}
	return nil
}

// String hides the token, so that a Token printed by mistake leaks
// nothing.
func (t Token) String() string {
	return fmt.Sprintf("token(%d bytes, expires %d)", len(t.Token), t.ExpiresUnix)
}
