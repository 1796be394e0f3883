package tunnel

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"time"
)

// Identity is what the tunnel verified about the peer of a session.
type Identity struct {
	// Node is the edge node name: the Common Name of the client certificate.
	// Empty on the client side, where the peer is the cloud.
	Node string
	// Serial is the certificate's serial number in hexadecimal.
	Serial string
	// NotAfter is when the certificate expires.
	NotAfter time.Time
	// Certificate is the verified leaf certificate.
	Certificate *x509.Certificate
}

// ErrPeerRefused is wrapped by every refusal of a peer during the handshake.
var ErrPeerRefused = errors.New("tunnel: peer refused")

// identityOf extracts the identity from a verified leaf certificate.
func identityOf(leaf *x509.Certificate) Identity {
	return Identity{
		Node:        leaf.Subject.CommonName,
		Serial:      leaf.SerialNumber.Text(16),
		NotAfter:    leaf.NotAfter,
		Certificate: leaf,
	}
}

// verifyClient checks a client's certificate chain against the pool, for
// client authentication, at the given time, and returns its identity. It is
// the one place that decides whether a client certificate is acceptable, so
// that both transports refuse for the same reasons.
func verifyClient(cs tls.ConnectionState, roots *x509.CertPool, now time.Time) (Identity, error) {
	if len(cs.PeerCertificates) == 0 {
		return Identity{}, fmt.Errorf("%w: no client certificate", ErrPeerRefused)
	}
	if roots == nil {
		return Identity{}, fmt.Errorf("%w: no client CA configured", ErrPeerRefused)
	}
	leaf := cs.PeerCertificates[0]
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	_, err := leaf.Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: inter,
		CurrentTime:   now,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	if err != nil {
		return Identity{}, fmt.Errorf("%w: verify client certificate %q: %w", ErrPeerRefused, leaf.Subject.CommonName, err)
	}
	id := identityOf(leaf)
	if id.Node == "" {
		return Identity{}, fmt.Errorf("%w: client certificate has no common name", ErrPeerRefused)
	}
	return id, nil
}
