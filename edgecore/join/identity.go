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
	// IdentityFile holds the node's private key (PEM PKCS #8) and its
	// client certificate (PEM) together, mode 0600. It is one file so that
	// replacing it is one atomic rename: after a crash or a power loss the
	// directory holds the old pair or the new pair, never a key of one and
	// the certificate of the other.
	IdentityFile = "node.pem"
	// CAFile is the cluster CA that the token vouched for, PEM, mode 0600.
	CAFile = "ca.crt"
	// KeyFile and CertFile are the separate key and certificate that
	// earlier versions wrote. Load reads them when IdentityFile is absent;
	// Store removes them once IdentityFile is written.
	KeyFile  = "node.key"
	CertFile = "node.crt"
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

// Store writes ca into dir as CAFile, then key and cert together as
// IdentityFile, each mode 0600 and replaced atomically (written to a
// temporary file, synced, renamed over the old one, and the directory
// synced), creating dir with mode 0700. Whenever it stops, Load finds the
// old identity or the new one, whole. The CA comes first: it is the same
// for both (a renewal never changes it), and a new CA without the new pair
// is what a failed join leaves, which joining again repairs.
func Store(dir string, key crypto.Signer, cert, ca *x509.Certificate) error {
	return store(dir, key, cert, ca, nil)
}

// store is Store with a hook called before each file system step (tests
// fail one to act as a crash at that point); nil means no hook.
func store(dir string, key crypto.Signer, cert, ca *x509.Certificate, step func(string) error) error {
	if key == nil || cert == nil || ca == nil {
		return errors.New("store node identity: key, certificate and CA are required")
	}
	if step == nil {
		step = func(string) error { return nil }
	}
	keyPEM, err := pki.EncodeKey(key)
	if err != nil {
		return fmt.Errorf("store node identity: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	if err := writeFileAtomic(filepath.Join(dir, CAFile), pki.EncodeCert(ca), step); err != nil {
		return err
	}
	if err := writeFileAtomic(filepath.Join(dir, IdentityFile), append(keyPEM, pki.EncodeCert(cert)...), step); err != nil {
		return err
	}
	// The separate files of earlier versions would only mislead a reader
	// now; Load no longer looks at them.
	for _, name := range []string{KeyFile, CertFile} {
		if err := os.Remove(filepath.Join(dir, name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("remove the old %s: %w", name, err)
		}
	}
	return nil
}

// writeFileAtomic replaces path with data, mode 0600, so that a crash
// leaves the old content or the new one: a temporary file in the same
// directory, synced, renamed over path, and the directory synced so the
// rename itself is durable.
func writeFileAtomic(path string, data []byte, step func(string) error) (err error) {
	dir, name := filepath.Dir(path), filepath.Base(path)
	if err := step("create " + name); err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, "."+name+".tmp-*")
	if err != nil {
		return fmt.Errorf("create a temporary file for %s: %w", path, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			_ = f.Close()
			_ = os.Remove(tmp)
		}
	}()
	if err := f.Chmod(0o600); err != nil {
		return fmt.Errorf("chmod %s: %w", tmp, err)
	}
	if err := step("write " + name); err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", tmp, err)
	}
	if err := step("sync " + name); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", tmp, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close %s: %w", tmp, err)
	}
	if err := step("rename " + name); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("rename %s to %s: %w", tmp, path, err)
	}
	if err := step("sync directory of " + name); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open %s to sync it: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

// Load reads the identity Store wrote: the key pair for TLS, a pool of the
// cluster CA and the parsed certificate. An identity in the separate files
// of earlier versions is read too; a key that does not match its
// certificate there is an error, which joining again repairs.
func Load(dir string) (tls.Certificate, *x509.CertPool, *x509.Certificate, error) {
	certPath, keyPath := filepath.Join(dir, IdentityFile), filepath.Join(dir, IdentityFile)
	if _, err := os.Lstat(certPath); errors.Is(err, fs.ErrNotExist) {
		certPath, keyPath = filepath.Join(dir, CertFile), filepath.Join(dir, KeyFile)
	}
	pair, leaf, err := loadPair(certPath, keyPath)
	if errors.Is(err, fs.ErrNotExist) {
		return tls.Certificate{}, nil, nil, fmt.Errorf("load the node identity from %s: %w; run edgecore join first", dir, err)
	}
	if err != nil {
		return tls.Certificate{}, nil, nil, fmt.Errorf("load the node identity from %s: %w", dir, err)
	}
	pool, err := pki.LoadPool(filepath.Join(dir, CAFile))
	if err != nil {
		return tls.Certificate{}, nil, nil, fmt.Errorf("load the node identity from %s: %w", dir, err)
	}
	return pair, pool, leaf, nil
}

// loadPair reads a key pair and parses its leaf.
func loadPair(certPath, keyPath string) (tls.Certificate, *x509.Certificate, error) {
	pair, err := tls.LoadX509KeyPair(certPath, keyPath)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	leaf := pair.Leaf
	if leaf == nil {
		if leaf, err = x509.ParseCertificate(pair.Certificate[0]); err != nil {
			return tls.Certificate{}, nil, fmt.Errorf("parse %s: %w", certPath, err)
		}
		pair.Leaf = leaf
	}
	return pair, leaf, nil
}

// issuedLater says whether a was issued after b: it starts later, or at
// the same second and lasts longer.
func issuedLater(a, b *x509.Certificate) bool {
	return a.NotBefore.After(b.NotBefore) || a.NotBefore.Equal(b.NotBefore) && a.NotAfter.After(b.NotAfter)
}

// LoadFiles reads an identity given as files (edgecore's --tls-cert,
// --tls-key and --ca), which edgecore never rewrites: renewals go to dir.
// So when dir holds an identity of the same node, chaining to the same CA
// and issued later than the files' certificate (a renewal), that one is
// returned instead; fromDir says so. A later certificate in the files (the
// operator provisioned a new one) wins over an older renewal.
func LoadFiles(certPath, keyPath, caPath, dir string) (pair tls.Certificate, pool *x509.CertPool, leaf *x509.Certificate, fromDir bool, err error) {
	pair, leaf, err = loadPair(certPath, keyPath)
	if err != nil {
		return tls.Certificate{}, nil, nil, false, fmt.Errorf("load node certificate: %w", err)
	}
	pool, err = pki.LoadPool(caPath)
	if err != nil {
		return tls.Certificate{}, nil, nil, false, err
	}
	p, _, l, err := Load(dir)
	if err != nil {
		// No renewal stored (or none readable): the files are the identity.
		return pair, pool, leaf, false, nil //nolint:nilerr // a missing or unreadable renewal is not an error here
	}
	if l.Subject.CommonName != leaf.Subject.CommonName || !issuedLater(l, leaf) {
		return pair, pool, leaf, false, nil
	}
	if _, err := l.Verify(x509.VerifyOptions{Roots: pool, CurrentTime: l.NotBefore,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return pair, pool, leaf, false, nil //nolint:nilerr // a renewal from another CA is not this identity's
	}
	return p, pool, l, true, nil
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
