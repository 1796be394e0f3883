// Package join defines how an edge node joins a Tether cluster: the join
// token's format, the check of the cluster CA against the hash the token
// carries, and the JSON messages of the join endpoint. Both CloudCore (which
// issues tokens and signs) and EdgeCore (which joins) use it; it does no I/O.
//
// A token is four dot-separated fields:
//
//	tj1.<id>.<secret>.<ca hash>
//
// "tj1" is the format version; id is 8 lowercase base32 characters and names
// the token (it is stored and logged); secret is 26 base32 characters (128
// bits, never stored: the cloud keeps only its SHA-256); ca hash is the
// lowercase hex SHA-256 of the cluster CA certificate's SubjectPublicKeyInfo,
// as kubeadm's discovery-token-ca-cert-hash, so the joining node can verify
// the CA it downloads before trusting it.
package join

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"encoding/base32"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
)

// Paths of the join endpoint (HTTPS, server-authenticated only: the node
// has no certificate yet).
const (
	// PathCA answers GET with the cluster CA certificate, PEM. The caller
	// must check it against the token's CA hash before trusting it.
	PathCA = "/tether/v1/ca"
	// PathJoin takes a POST of a Request and answers a Response.
	PathJoin = "/tether/v1/join"
)

// Request is the JSON body of a join. The CSR's subject is ignored: the
// certificate is issued for the node the token is bound to.
type Request struct {
	// Node is the name the edge believes it has; it must match the token.
	Node string `json:"node"`
	// Token is the whole join token.
	Token string `json:"token"`
	// CSR is a PEM "CERTIFICATE REQUEST" signed by the node's own new key.
	CSR string `json:"csr"`
}

// Response is the JSON answer of a join: the certificate or an error.
type Response struct {
	// Certificate is the node's client certificate, PEM.
	Certificate string `json:"certificate,omitempty"`
	// CA is the cluster CA, PEM.
	CA string `json:"ca,omitempty"`
	// Error says why the join was refused.
	Error string `json:"error,omitempty"`
}

// Token is a parsed join token.
type Token struct {
	ID     string
	Secret string
	CAHash string
}

// ErrBadToken is wrapped by every token parsing or checking error.
var ErrBadToken = errors.New("join: invalid token")

// ErrCAMismatch means a downloaded CA does not match the token's hash.
var ErrCAMismatch = errors.New("join: cluster CA does not match the token's CA hash")

const (
	prefix    = "tj1"
	idLen     = 8
	secretLen = 26
)

var b32 = base32.StdEncoding.WithPadding(base32.NoPadding)

// NewToken returns a fresh token for the CA.
func NewToken(ca *x509.Certificate) (Token, error) {
	id, err := randomB32(idLen)
	if err != nil {
		return Token{}, err
	}
	secret, err := randomB32(secretLen)
	if err != nil {
		return Token{}, err
	}
	return Token{ID: id, Secret: secret, CAHash: CAHash(ca)}, nil
}

func randomB32(n int) (string, error) {
	b := make([]byte, (n*5+7)/8)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("random token: %w", err)
	}
	return strings.ToLower(b32.EncodeToString(b))[:n], nil
}

// String returns the token as the operator types it.
func (t Token) String() string {
	return prefix + "." + t.ID + "." + t.Secret + "." + t.CAHash
}

// Parse checks a token's format.
func Parse(s string) (Token, error) {
	// At most five parts: more than four is refused, and a long run of
	// dots costs nothing.
	parts := strings.SplitN(strings.TrimSpace(s), ".", 5)
	if len(parts) != 4 || parts[0] != prefix {
		return Token{}, fmt.Errorf("%w: want tj1.<id>.<secret>.<ca hash>", ErrBadToken)
	}
	t := Token{ID: parts[1], Secret: parts[2], CAHash: strings.ToLower(parts[3])}
	if len(t.ID) != idLen || !isB32(t.ID) {
		return Token{}, fmt.Errorf("%w: id must be %d base32 characters", ErrBadToken, idLen)
	}
	if len(t.Secret) != secretLen || !isB32(t.Secret) {
		return Token{}, fmt.Errorf("%w: secret must be %d base32 characters", ErrBadToken, secretLen)
	}
	if len(t.CAHash) != 64 {
		return Token{}, fmt.Errorf("%w: CA hash must be 64 hex characters", ErrBadToken)
	}
	if _, err := hex.DecodeString(t.CAHash); err != nil {
		return Token{}, fmt.Errorf("%w: CA hash is not hex", ErrBadToken)
	}
	return t, nil
}

func isB32(s string) bool {
	for _, c := range s {
		if (c < 'a' || c > 'z') && (c < '2' || c > '7') {
			return false
		}
	}
	return true
}

// SecretHash is what the cloud stores instead of the secret: hex SHA-256.
func SecretHash(secret string) string {
	h := sha256.Sum256([]byte(secret))
	return hex.EncodeToString(h[:])
}

// SecretMatches compares a presented secret with a stored hash in
// constant time.
func SecretMatches(secret, storedHash string) bool {
	got := SecretHash(secret)
	return subtle.ConstantTimeCompare([]byte(got), []byte(storedHash)) == 1
}

// CAHash is the hex SHA-256 of the certificate's SubjectPublicKeyInfo.
func CAHash(ca *x509.Certificate) string {
	h := sha256.Sum256(ca.RawSubjectPublicKeyInfo)
	return hex.EncodeToString(h[:])
}

// VerifyCA checks a downloaded CA certificate against the token.
func (t Token) VerifyCA(ca *x509.Certificate) error {
	if !ca.IsCA {
		return fmt.Errorf("%w: the certificate is not a CA", ErrCAMismatch)
	}
	if subtle.ConstantTimeCompare([]byte(CAHash(ca)), []byte(t.CAHash)) != 1 {
		return fmt.Errorf("%w: got sha256:%s, token says sha256:%s", ErrCAMismatch, CAHash(ca), t.CAHash)
	}
	return nil
}
