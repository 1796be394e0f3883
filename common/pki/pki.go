// Package pki creates and loads the X.509 material of a Tether cluster: the
// cluster CA, CloudCore's server certificate and edge node client
// certificates, as PEM files. It decides nothing about who may have a
// certificate; that is CloudCore's onboarding.
package pki

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
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// CA is a certificate authority with its private key.
type CA struct {
	Cert *x509.Certificate
	Key  crypto.Signer
}

// NewCA creates a self-signed CA valid for the given duration.
func NewCA(commonName string, validity time.Duration) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate CA key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: commonName},
		NotBefore:             now.Add(-5 * time.Minute),
		NotAfter:              now.Add(validity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("self-sign CA: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse CA: %w", err)
	}
	return &CA{Cert: cert, Key: key}, nil
}

// Usage says what a leaf certificate is for.
type Usage int

// Certificate usages.
const (
	// UsageClient is an edge node's certificate: client authentication only.
	UsageClient Usage = iota
	// UsageServer is CloudCore's certificate: server authentication only.
	UsageServer
)

// LeafRequest describes a certificate to issue.
type LeafRequest struct {
	// CommonName is the subject; for a client it is the node name.
	CommonName string
	// Usage is client or server authentication.
	Usage Usage
	// Hosts are DNS names or IP addresses for a server certificate's SANs.
	Hosts []string
	// Validity is how long the certificate is valid.
	Validity time.Duration
	// PublicKey is the key to certify. Nil makes a new key pair, returned
	// with the certificate.
	PublicKey crypto.PublicKey
}

// Issue signs a leaf certificate. When the request has no public key it
// generates a key pair and returns its private key too.
func (ca *CA) Issue(req LeafRequest) (*x509.Certificate, crypto.Signer, error) {
	if req.Validity <= 0 {
		return nil, nil, errors.New("issue certificate: validity must be positive")
	}
	var key crypto.Signer
	pub := req.PublicKey
	if pub == nil {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, nil, fmt.Errorf("generate key: %w", err)
		}
		key, pub = k, k.Public()
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: req.CommonName},
		// Backdated for clock skew, by at most a tenth of the lifetime so
		// that short-lived certificates keep most of theirs ahead.
		NotBefore: now.Add(-min(5*time.Minute, req.Validity/10)),
		NotAfter:  now.Add(req.Validity),
		KeyUsage:  x509.KeyUsageDigitalSignature,
	}
	switch req.Usage {
	case UsageClient:
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	case UsageServer:
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		for _, h := range req.Hosts {
			if ip := net.ParseIP(h); ip != nil {
				tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
			} else {
				tmpl.DNSNames = append(tmpl.DNSNames, h)
			}
		}
	default:
		return nil, nil, fmt.Errorf("issue certificate: unknown usage %d", req.Usage)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, pub, ca.Key)
	if err != nil {
		return nil, nil, fmt.Errorf("sign certificate for %q: %w", req.CommonName, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, fmt.Errorf("parse issued certificate: %w", err)
	}
	return cert, key, nil
}

// Pool returns a pool holding only the CA certificate.
func (ca *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.Cert)
	return p
}

func randomSerial() (*big.Int, error) {
	s, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("random serial: %w", err)
	}
	return s.Add(s, big.NewInt(1)), nil
}

// EncodeCert returns the PEM encoding of a certificate.
func EncodeCert(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

// EncodeKey returns the PEM (PKCS #8) encoding of a private key.
func EncodeKey(k crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, fmt.Errorf("marshal key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// WriteFiles writes a certificate and, when key is not nil, its key as PEM
// files readable by the owner only. Each file is written to a temporary
// name and renamed, so a crash never leaves half a file.
func WriteFiles(certPath string, cert *x509.Certificate, keyPath string, key crypto.Signer) error {
	if err := writeAtomic(certPath, EncodeCert(cert)); err != nil {
		return err
	}
	if key == nil {
		return nil
	}
	b, err := EncodeKey(key)
	if err != nil {
		return err
	}
	return writeAtomic(keyPath, b)
}

func writeAtomic(path string, data []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("create directory for %s: %w", path, err)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return fmt.Errorf("write %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("rename %s: %w", tmp, err)
	}
	return nil
}

// LoadCA reads a CA certificate and key from PEM files.
func LoadCA(certPath, keyPath string) (*CA, error) {
	pair, err := tls.LoadX509KeyPair(certPath, keyPath)
	if err != nil {
		return nil, fmt.Errorf("load CA: %w", err)
	}
	signer, ok := pair.PrivateKey.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("load CA: key in %s cannot sign", keyPath)
	}
	if !pair.Leaf.IsCA {
		return nil, fmt.Errorf("load CA: %s is not a CA certificate", certPath)
	}
	return &CA{Cert: pair.Leaf, Key: signer}, nil
}

// LoadPool reads a PEM file of one or more CA certificates.
func LoadPool(path string) (*x509.CertPool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read CA bundle: %w", err)
	}
	p := x509.NewCertPool()
	if !p.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("read CA bundle %s: no PEM certificate", path)
	}
	return p, nil
}
