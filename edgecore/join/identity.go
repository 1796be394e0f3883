package join

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/tetheredge/tether/common/pki"
)

// Files of a node's identity, in the directory given to Join, Store and
// Load (edgecore's --data-dir).
const (
	// KeyFile is the node's private key, PEM PKCS #8, mode 0600.
	KeyFile = "node.key"
	// CertFile is the node's client certificate, PEM, mode 0600.
	CertFile = "node.crt"
	// CAFile is the cluster CA that the token vouched for, PEM, mode 0600.
	CAFile = "ca.crt"
)

// ErrExpired is wrapped by CheckUsable's error for an expired certificate.
var ErrExpired = errors.New("join: node certificate expired")

// NewRenewalKey makes a fresh node key and a certificate request signed by
// it, PEM, for renewing the certificate over a live session. The request's
// subject is empty: the cloud issues for the node the session belongs to.
func NewRenewalKey() (*ecdsa.PrivateKey, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate the renewal key: %w", err)
	}
	csr, err := newCSR(key, "")
	if err != nil {
		return nil, nil, err
	}
	return key, csr, nil
}

// newCSR returns a PEM certificate request for key with the given common
// name; the cloud ignores the subject.
func newCSR(key crypto.Signer, commonName string) ([]byte, error) {
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: commonName},
	}, key)
	if err != nil {
		return nil, fmt.Errorf("create certificate request: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
}

// ValidateIssued checks a certificate the cloud issued before it is
// stored: one PEM certificate, signed by ca, not a CA, for node, for client
// authentication, certifying key, and valid now.
func ValidateIssued(certPEM []byte, ca *x509.Certificate, node string, key crypto.PublicKey) (*x509.Certificate, error) {
	return validateIssuedAt(certPEM, ca, node, key, time.Now())
}

func validateIssuedAt(certPEM []byte, ca *x509.Certificate, node string, key crypto.PublicKey, now time.Time) (*x509.Certificate, error) {
	if ca == nil {
		return nil, errors.New("no CA to check the certificate against")
	}
	leaf, err := parseOneCert(certPEM)
	if err != nil {
		return nil, err
	}
	if err := leaf.CheckSignatureFrom(ca); err != nil {
		return nil, fmt.Errorf("the certificate is not signed by the cluster CA: %w", err)
	}
	if leaf.IsCA {
		return nil, errors.New("the certificate is a CA certificate, not a node certificate")
	}
	if leaf.Subject.CommonName != node {
		return nil, fmt.Errorf("the certificate is for %q, not for this node %q", leaf.Subject.CommonName, node)
	}
	if !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageClientAuth) {
		return nil, errors.New("the certificate is not for client authentication")
	}
	pub, ok := leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(key) {
		return nil, errors.New("the certificate certifies another public key than this node's")
	}
	if now.Before(leaf.NotBefore) {
		return nil, fmt.Errorf("the certificate is not valid until %s; check this node's clock", stamp(leaf.NotBefore))
	}
	if now.After(leaf.NotAfter) {
		return nil, fmt.Errorf("the certificate expired at %s", stamp(leaf.NotAfter))
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	if _, err := leaf.Verify(x509.VerifyOptions{
		Roots:       roots,
		CurrentTime: now,
		KeyUsages:   []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}); err != nil {
		return nil, fmt.Errorf("the certificate does not verify against the cluster CA: %w", err)
	}
	return leaf, nil
}

// Store writes key, cert and ca into dir as KeyFile, CertFile and CAFile,
// mode 0600, creating dir with mode 0700. Each file is replaced atomically;
// the three together are not (see Load).
func Store(dir string, key crypto.Signer, cert, ca *x509.Certificate) error {
	if key == nil || cert == nil || ca == nil {
		return errors.New("store node identity: key, certificate and CA are required")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	if err := pki.WriteFiles(filepath.Join(dir, CAFile), ca, "", nil); err != nil {
		return err
	}
	return pki.WriteFiles(filepath.Join(dir, CertFile), cert, filepath.Join(dir, KeyFile), key)
}

// Load reads the identity Store wrote: the key pair for TLS, a pool of the
// cluster CA and the parsed certificate. A key that does not match the
// certificate (a crash between Store's renames) is an error; joining again
// repairs it.
func Load(dir string) (tls.Certificate, *x509.CertPool, *x509.Certificate, error) {
	certPath, keyPath := filepath.Join(dir, CertFile), filepath.Join(dir, KeyFile)
	pair, err := tls.LoadX509KeyPair(certPath, keyPath)
	if errors.Is(err, fs.ErrNotExist) {
		return tls.Certificate{}, nil, nil, fmt.Errorf("load the node identity from %s: %w; run edgecore join first", dir, err)
	}
	if err != nil {
		return tls.Certificate{}, nil, nil, fmt.Errorf("load the node identity from %s: %w", dir, err)
	}
	leaf := pair.Leaf
	if leaf == nil {
		if leaf, err = x509.ParseCertificate(pair.Certificate[0]); err != nil {
			return tls.Certificate{}, nil, nil, fmt.Errorf("parse %s: %w", certPath, err)
		}
		pair.Leaf = leaf
	}
	pool, err := pki.LoadPool(filepath.Join(dir, CAFile))
	if err != nil {
		return tls.Certificate{}, nil, nil, fmt.Errorf("load the node identity from %s: %w", dir, err)
	}
	return pair, pool, leaf, nil
}

// RenewAt is when to renew leaf: after 80% of its lifetime.
func RenewAt(leaf *x509.Certificate) time.Time {
	life := leaf.NotAfter.Sub(leaf.NotBefore)
	if life <= 0 {
		return leaf.NotBefore
	}
	return leaf.NotBefore.Add(life / 10 * 8)
}

// CheckUsable says whether leaf can be used at now. An expired certificate
// cannot be renewed over a session, so the error, which wraps ErrExpired,
// tells the operator how to join again.
func CheckUsable(leaf *x509.Certificate, now time.Time) error {
	if now.After(leaf.NotAfter) {
		node := leaf.Subject.CommonName
		if node == "" {
			node = "<node>"
		}
		return &explainedError{
			msg: fmt.Sprintf("the node certificate expired at %s; ask the operator for a new token "+
				"(cloudcore admin allow %s) and run edgecore join again", stamp(leaf.NotAfter), node),
			err: ErrExpired,
		}
	}
	if now.Before(leaf.NotBefore) {
		return fmt.Errorf("the node certificate is not valid until %s; check this node's clock", stamp(leaf.NotBefore))
	}
	return nil
}

func stamp(t time.Time) string {
	return t.UTC().Format(time.RFC3339)
}
