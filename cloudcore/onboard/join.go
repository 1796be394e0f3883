package onboard

import (
	"context"
	"crypto/subtle"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tetheredge/tether/cloudcore/edgenode"
	"github.com/tetheredge/tether/common/join"
)

// Reasons for refusing a join: the values of tether_join_refused_total's
// reason label.
const (
	reasonMalformedRequest = "malformed_request"
	reasonMalformedToken   = "malformed_token"
	reasonWrongCA          = "wrong_ca"
	reasonUnknownNode      = "unknown_node"
	reasonDisabled         = "disabled"
	reasonInvalidToken     = "invalid_token"
	reasonExpiredToken     = "expired_token"
	reasonTokenUsed        = "token_used"
	reasonBadCSR           = "bad_csr"
	reasonRateLimited      = "rate_limited"
)

var refusalReasons = []string{
	reasonMalformedRequest, reasonMalformedToken, reasonWrongCA, reasonUnknownNode, reasonDisabled,
	reasonInvalidToken, reasonExpiredToken, reasonTokenUsed, reasonBadCSR, reasonRateLimited,
}

// updateAttempts bounds the retries of an EdgeNode write that lost a race
// with another writer (the whitelist recording a connection, an operator).
const updateAttempts = 5

// refusal is a join refused on purpose: its HTTP status, its metric reason
// and the sentence the node's operator reads.
type refusal struct {
	status int
	reason string
	msg    string
}

func (r *refusal) Error() string { return r.msg }

func refused(status int, reason, msg string) *refusal {
	return &refusal{status: status, reason: reason, msg: msg}
}

func notWhitelisted(node string) *refusal {
	return refused(http.StatusForbidden, reasonUnknownNode, fmt.Sprintf("node %s is not on the whitelist", node))
}

func tokenNotValid(node string) *refusal {
	// One sentence for a forged secret, another node's token, a token
	// replaced by a newer one and a token already used: which one it was
	// would help someone guessing.
	return refused(http.StatusForbidden, reasonInvalidToken,
		fmt.Sprintf("token is not valid (or already used) for node %s", node))
}

// join decides a join request and, when it is accepted, uses the token up,
// issues the certificate and records it as the node's current one. A
// refusal is a *refusal and leaves the EdgeNode as it was.
func (s *Service) join(ctx context.Context, req join.Request) (*x509.Certificate, error) {
	node := req.Node
	if err := validateNodeName(node); err != nil {
		return nil, refused(http.StatusBadRequest, reasonMalformedRequest, "malformed request: "+err.Error())
	}
	tok, err := join.Parse(req.Token)
	if err != nil {
		return nil, refused(http.StatusBadRequest, reasonMalformedToken, "malformed token: "+err.Error())
	}
	if subtle.ConstantTimeCompare([]byte(tok.CAHash), []byte(s.caHash)) != 1 {
		return nil, refused(http.StatusForbidden, reasonWrongCA, fmt.Sprintf(
			"token was issued for another cluster CA (sha256:%s); this cloud's CA is sha256:%s", tok.CAHash, s.caHash))
	}

	e, err := s.cfg.EdgeNodes.Get(ctx, node)
	if err != nil {
		if apierrors.IsNotFound(err) {
			return nil, notWhitelisted(node)
		}
		return nil, fmt.Errorf("read EdgeNode %s: %w", node, err)
	}
	if err := s.checkToken(e, tok); err != nil {
		return nil, err
	}
	// The request is checked and the certificate signed before the token is
	// used: a bad request leaves the token usable, and a certificate is
	// never handed out unless the token was used by this request.
	csr, err := ParseCSR([]byte(req.CSR))
	if err != nil {
		return nil, refused(http.StatusBadRequest, reasonBadCSR, err.Error())
	}
	cert, err := s.cfg.Issuer.sign(csr, node)
	if err != nil {
		return nil, err
	}
	used, err := s.useToken(ctx, e, tok)
	if err != nil {
		return nil, err
	}
	if err := recordCertificate(ctx, s.cfg.EdgeNodes, used, node, joined(cert)); err != nil {
		// The token is gone and the node holds no certificate on record:
		// the operator has to issue a new token.
		return nil, fmt.Errorf("record the certificate of node %s after using its token: %w", node, err)
	}
	return cert, nil
}

// checkToken decides whether tok lets e join now.
func (s *Service) checkToken(e *edgenode.EdgeNode, tok join.Token) error {
	node := e.Name
	if !e.Spec.Allowed {
		return refused(http.StatusForbidden, reasonDisabled, fmt.Sprintf("node %s is disabled", node))
	}
	pending := e.Spec.Join
	// Every part is compared, whatever the result of the others, so that
	// the time taken says nothing about which part failed.
	idOK := pending != nil && subtle.ConstantTimeCompare([]byte(pending.TokenID), []byte(tok.ID)) == 1
	secretOK := pending != nil && join.SecretMatches(tok.Secret, pending.SecretHash)
	if !idOK || !secretOK {
		return tokenNotValid(node)
	}
	if exp := pending.Expires.Time; s.cfg.Now().After(exp) {
		return refused(http.StatusForbidden, reasonExpiredToken, fmt.Sprintf(
			"token expired at %s; issue a new one with cloudcore admin allow %s", exp.UTC().Format(time.RFC3339), node))
	}
	return nil
}

// useToken removes tok from the EdgeNode, conditional on the version that
// was checked: of two joins racing with the same token, one wins. A write
// that lost to an unrelated change (a status update) is checked again on
// the fresh object and retried. It returns the EdgeNode as written.
func (s *Service) useToken(ctx context.Context, e *edgenode.EdgeNode, tok join.Token) (*edgenode.EdgeNode, error) {
	node := e.Name
	for attempt := 1; ; attempt++ {
		e.Spec.Join = nil
		used, err := s.cfg.EdgeNodes.Update(ctx, e)
		switch {
		case err == nil:
			return used, nil
		case apierrors.IsNotFound(err):
			return nil, notWhitelisted(node)
		case !apierrors.IsConflict(err):
			return nil, fmt.Errorf("use the join token of node %s: %w", node, err)
		case attempt == updateAttempts:
			return nil, fmt.Errorf("use the join token of node %s: still conflicting after %d attempts: %w", node, attempt, err)
		}
		fresh, err := s.cfg.EdgeNodes.Get(ctx, node)
		if err != nil {
			if apierrors.IsNotFound(err) {
				return nil, notWhitelisted(node)
			}
			return nil, fmt.Errorf("read EdgeNode %s: %w", node, err)
		}
		if err := s.checkToken(fresh, tok); err != nil {
			var r *refusal
			if errors.As(err, &r) && r.reason == reasonInvalidToken {
				// It was valid a moment ago: a concurrent join used it (or
				// an operator replaced it).
				return nil, refused(http.StatusForbidden, reasonTokenUsed, fmt.Sprintf("token already used for node %s", node))
			}
			return nil, err
		}
		e = fresh
	}
}

// recordCertificate writes the certificate status that update sets on the
// EdgeNode. It writes over e, the latest version the caller read (nil:
// read it here); when it loses a race with another writer it reads the
// node again and runs update on the fresh version (update's error stops
// the write), so update must decide from what it is given.
func recordCertificate(ctx context.Context, nodes *edgenode.Client, e *edgenode.EdgeNode, node string,
	update func(*edgenode.EdgeNode) error) error {
	for attempt := 1; ; attempt++ {
		if e == nil {
			fresh, err := nodes.Get(ctx, node)
			if err != nil {
				return fmt.Errorf("read EdgeNode %s: %w", node, err)
			}
			e = fresh
		}
		if err := update(e); err != nil {
			return err
		}
		_, err := nodes.UpdateStatus(ctx, e)
		switch {
		case err == nil:
			return nil
		case !apierrors.IsConflict(err):
			return fmt.Errorf("update the status of EdgeNode %s: %w", node, err)
		case attempt == updateAttempts:
			return fmt.Errorf("update the status of EdgeNode %s: still conflicting after %d attempts: %w", node, attempt, err)
		}
		e = nil
	}
}

// certRecord is how the status names cert.
func certRecord(cert *x509.Certificate) *edgenode.Certificate {
	return &edgenode.Certificate{Serial: cert.SerialNumber.Text(16), NotAfter: metav1.NewTime(cert.NotAfter)}
}

// joined makes cert the node's only accepted certificate: a join
// supersedes every earlier one at once, with no grace.
func joined(cert *x509.Certificate) func(*edgenode.EdgeNode) error {
	return func(e *edgenode.EdgeNode) error {
		e.Status.Certificate, e.Status.Previous = certRecord(cert), nil
		return nil
	}
}
