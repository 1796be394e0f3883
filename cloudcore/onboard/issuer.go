package onboard

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"time"

	"github.com/tetheredge/tether/common/pki"
)

// DefaultValidity is how long a node certificate is valid unless the
// Issuer says otherwise.
const DefaultValidity = 90 * 24 * time.Hour

// MaxCSRBytes bounds a PEM certificate request.
const MaxCSRBytes = 16 << 10

// Limits on the keys a node may have certified.
const (
	minRSABits = 2048
	maxRSABits = 8192 // beyond this, checking signatures is a cost an attacker chooses
)

const csrPEMType = "CERTIFICATE REQUEST"

// Issuer signs node client certificates with the cluster CA. The
// certificate's subject is the node name the caller vouches for, never what
// the request asks; it is for client authentication only, with no SANs, and
// cannot sign certificates.
type Issuer struct {
	// CA signs. Required.
	CA *pki.CA
	// Validity of the certificates issued. Zero means DefaultValidity. A
	// certificate never outlives the CA: closer to the CA's end, it is
	// shorter.
	Validity time.Duration
}

// Sign checks a PEM certificate request and issues a certificate for node
// with its public key.
func (i *Issuer) Sign(csrPEM []byte, node string) (*x509.Certificate, error) {
	csr, err := ParseCSR(csrPEM)
	if err != nil {
		return nil, err
	}
	return i.sign(csr, node)
}

// sign issues a certificate for node over an already checked request.
func (i *Issuer) sign(csr *x509.CertificateRequest, node string) (*x509.Certificate, error) {
	if i == nil || i.CA == nil || i.CA.Cert == nil || i.CA.Key == nil {
		return nil, errors.New("sign node certificate: issuer has no CA")
	}
	if err := validateNodeName(node); err != nil {
		return nil, fmt.Errorf("sign node certificate: %w", err)
	}
	validity := i.Validity
	if validity == 0 {
		validity = DefaultValidity
	}
	if validity < 0 {
		return nil, fmt.Errorf("sign node certificate: negative validity %s", validity)
	}
	if left := time.Until(i.CA.Cert.NotAfter); left < validity {
		if left <= time.Minute {
			return nil, fmt.Errorf("sign node certificate: the cluster CA expires at %s", i.CA.Cert.NotAfter.UTC().Format(time.RFC3339))
		}
		validity = left
	}
	cert, _, err := i.CA.Issue(pki.LeafRequest{CommonName: node, Usage: pki.UsageClient, Validity: validity, PublicKey: csr.PublicKey})
	if err != nil {
		return nil, fmt.Errorf("sign node certificate: %w", err)
	}
	return cert, nil
}

// ParseCSR decodes and checks a PEM certificate request from the network:
// at most MaxCSRBytes, exactly one CERTIFICATE REQUEST block and nothing
// else, self-signed by the key it holds, and that key of an accepted kind
// (ECDSA P-256 or P-384, RSA of 2048 to 8192 bits, Ed25519). Its errors
// wrap ErrBadCSR.
func ParseCSR(csrPEM []byte) (*x509.CertificateRequest, error) {
	if len(csrPEM) > MaxCSRBytes {
		return nil, fmt.Errorf("%w: %d bytes, at most %d", ErrBadCSR, len(csrPEM), MaxCSRBytes)
	}
	block, rest := pem.Decode(csrPEM)
	if block == nil {
		return nil, fmt.Errorf("%w: not PEM", ErrBadCSR)
	}
	if block.Type != csrPEMType {
		return nil, fmt.Errorf("%w: PEM block is %q, want %q", ErrBadCSR, block.Type, csrPEMType)
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, fmt.Errorf("%w: data after the certificate request", ErrBadCSR)
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadCSR, err)
	}
	if err := checkPublicKey(csr.PublicKey); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadCSR, err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("%w: signature: %w", ErrBadCSR, err)
	}
	return csr, nil
}

// checkPublicKey accepts the key kinds and sizes a node may use. It runs
// before the signature check so that an oversized key costs nothing.
func checkPublicKey(pub any) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return fmt.Errorf("ECDSA curve %s is not accepted; use P-256 or P-384", k.Curve.Params().Name)
		}
	case *rsa.PublicKey:
		if n := k.N.BitLen(); n < minRSABits || n > maxRSABits {
			return fmt.Errorf("RSA key of %d bits is not accepted; use %d to %d bits", n, minRSABits, maxRSABits)
		}
	case ed25519.PublicKey:
	default:
		return fmt.Errorf("public key type %T is not accepted", pub)
	}
	return nil
}
