package join

import (
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/common/pki"
)

func TestValidateIssued(t *testing.T) {
	ca := newCA(t)
	other := newCA(t)
	key := newKey(t)
	now := time.Now()
	issue := func(cn string, usage pki.Usage) []byte {
		cert, _, err := ca.Issue(pki.LeafRequest{CommonName: cn, Usage: usage, Hosts: []string{"x"}, Validity: time.Hour, PublicKey: key.Public()})
		require.NoError(t, err)
		return pki.EncodeCert(cert)
	}
	fromOther, _, err := other.Issue(pki.LeafRequest{CommonName: testNode, Validity: time.Hour, PublicKey: key.Public()})
	require.NoError(t, err)
	good := issue(testNode, pki.UsageClient)
	tests := []struct {
		name    string
		pem     []byte
		at      time.Time
		wantErr string
	}{
		{name: "good", pem: good, at: now},
		{name: "other node", pem: issue("edge-2", pki.UsageClient), at: now, wantErr: `is for "edge-2"`},
		{name: "server usage", pem: issue(testNode, pki.UsageServer), at: now, wantErr: "not for client authentication"},
		{name: "other key", pem: signLeaf(t, ca, testNode, newKey(t).Public(), now.Add(-time.Minute), now.Add(time.Hour)), at: now, wantErr: "another public key"},
		{name: "expired", pem: good, at: now.Add(2 * time.Hour), wantErr: "the certificate expired at"},
		{name: "not yet valid", pem: good, at: now.Add(-time.Hour), wantErr: "check this node's clock"},
		{name: "other CA", pem: pki.EncodeCert(fromOther), at: now, wantErr: "not signed by the cluster CA"},
		{name: "the CA itself", pem: pki.EncodeCert(ca.Cert), at: now, wantErr: "is a CA certificate"},
		{name: "not PEM", pem: []byte("certificate"), at: now, wantErr: "no PEM certificate"},
		{name: "two certificates", pem: append(append([]byte{}, good...), good...), at: now, wantErr: "exactly one"},
		{name: "a key, not a certificate", pem: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte{1}}), at: now, wantErr: `"PRIVATE KEY"`},
		{name: "bad DER", pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{1, 2}}), at: now, wantErr: "parse certificate"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			leaf, err := validateIssuedAt(tc.pem, ca.Cert, testNode, key.Public(), tc.at)
			if tc.wantErr != "" {
				require.ErrorContains(t, err, tc.wantErr)
				require.Nil(t, leaf)
				return
			}
			require.NoError(t, err)
			require.Equal(t, testNode, leaf.Subject.CommonName)
		})
	}

	leaf, err := ValidateIssued(good, ca.Cert, testNode, key.Public())
	require.NoError(t, err)
	require.NotNil(t, leaf)
	_, err = ValidateIssued(good, nil, testNode, key.Public())
	require.ErrorContains(t, err, "no CA")
}

func TestRenewalKeyStoreLoad(t *testing.T) {
	ca := newCA(t)
	key, csrPEM, err := NewRenewalKey()
	require.NoError(t, err)
	block, rest := pem.Decode(csrPEM)
	require.NotNil(t, block)
	require.Empty(t, rest)
	require.Equal(t, "CERTIFICATE REQUEST", block.Type)
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	require.NoError(t, err)
	require.NoError(t, csr.CheckSignature())
	require.True(t, key.PublicKey.Equal(csr.PublicKey))

	cert, _, err := ca.Issue(pki.LeafRequest{CommonName: testNode, Validity: time.Hour, PublicKey: csr.PublicKey})
	require.NoError(t, err)
	leaf, err := ValidateIssued(pki.EncodeCert(cert), ca.Cert, testNode, key.Public())
	require.NoError(t, err)

	dir := filepath.Join(t.TempDir(), "data")
	_, _, _, err = Load(dir)
	require.ErrorIs(t, err, fs.ErrNotExist)
	require.ErrorContains(t, err, "run edgecore join first")

	require.NoError(t, Store(dir, key, leaf, ca.Cert))
	for _, name := range []string{IdentityFile, CAFile} {
		info, err := os.Stat(filepath.Join(dir, name))
		require.NoError(t, err)
		require.Equal(t, fs.FileMode(0o600), info.Mode().Perm(), name)
	}
	pair, pool, loaded, err := Load(dir)
	require.NoError(t, err)
	require.Equal(t, leaf.Raw, loaded.Raw)
	require.Equal(t, leaf.Raw, pair.Certificate[0])
	_, err = loaded.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	require.NoError(t, err)

	// An identity in the separate files of earlier versions still loads,
	// and a key left from another pair there is caught.
	legacy := t.TempDir()
	require.NoError(t, pki.WriteFiles(filepath.Join(legacy, CertFile), leaf, filepath.Join(legacy, KeyFile), key))
	require.NoError(t, pki.WriteFiles(filepath.Join(legacy, CAFile), ca.Cert, "", nil))
	_, _, loaded, err = Load(legacy)
	require.NoError(t, err)
	require.Equal(t, leaf.Raw, loaded.Raw)
	key2, _, err := NewRenewalKey()
	require.NoError(t, err)
	require.NoError(t, pki.WriteFiles(filepath.Join(legacy, "unused.crt"), leaf, filepath.Join(legacy, KeyFile), key2))
	_, _, _, err = Load(legacy)
	require.ErrorContains(t, err, "load the node identity")
	// Storing there replaces them with the one file.
	require.NoError(t, Store(legacy, key, leaf, ca.Cert))
	for _, name := range []string{KeyFile, CertFile} {
		_, err := os.Stat(filepath.Join(legacy, name))
		require.ErrorIs(t, err, fs.ErrNotExist, name)
	}
	_, _, loaded, err = Load(legacy)
	require.NoError(t, err)
	require.Equal(t, leaf.Raw, loaded.Raw)

	require.ErrorContains(t, Store(dir, nil, leaf, ca.Cert), "required")
}

// issued returns a fresh key and a certificate for it, issued by ca for
// node.
func issued(t *testing.T, ca *pki.CA, node string, validity time.Duration) (crypto.Signer, *x509.Certificate) {
	t.Helper()
	key, _, err := NewRenewalKey()
	require.NoError(t, err)
	cert, _, err := ca.Issue(pki.LeafRequest{CommonName: node, Validity: validity, PublicKey: key.Public()})
	require.NoError(t, err)
	return key, cert
}

// issuedAt is issued with a chosen start of validity.
func issuedAt(t *testing.T, ca *pki.CA, node string, notBefore time.Time) (crypto.Signer, *x509.Certificate) {
	t.Helper()
	key, _, err := NewRenewalKey()
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(notBefore.UnixNano()),
		Subject:      pkix.Name{CommonName: node},
		NotBefore:    notBefore,
		NotAfter:     notBefore.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.Key)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	return key, cert
}

// A crash at any step of replacing the identity leaves a pair that loads,
// whose key matches its certificate: the old one before the rename, the
// new one after.
func TestStoreCrashAtEveryStep(t *testing.T) {
	ca := newCA(t)
	oldKey, oldCert := issued(t, ca, testNode, time.Hour)
	newKey, newCert := issued(t, ca, testNode, time.Hour)

	// The steps of one Store, as it performs them.
	var steps []string
	require.NoError(t, store(t.TempDir(), newKey, newCert, ca.Cert, func(s string) error {
		steps = append(steps, s)
		return nil
	}))
	require.Greater(t, len(steps), 8)

	errCrash := errors.New("crash")
	renamed := false
	for i, at := range steps {
		t.Run(strconv.Itoa(i)+" "+at, func(t *testing.T) {
			dir := t.TempDir()
			require.NoError(t, Store(dir, oldKey, oldCert, ca.Cert))
			err := store(dir, newKey, newCert, ca.Cert, func(s string) error {
				if s == at {
					return errCrash
				}
				return nil
			})
			require.ErrorIs(t, err, errCrash)
			pair, _, leaf, err := Load(dir)
			require.NoError(t, err, "the identity does not load after a crash at %q", at)
			require.True(t, leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(pair.PrivateKey.(crypto.Signer).Public()),
				"key and certificate of different pairs after a crash at %q", at)
			want := oldCert
			if renamed {
				want = newCert
			}
			require.Equal(t, want.Raw, leaf.Raw, "crash at %q", at)
			entries, err := os.ReadDir(dir)
			require.NoError(t, err)
			for _, e := range entries {
				require.Contains(t, []string{IdentityFile, CAFile}, e.Name(), "file left behind")
			}
		})
		// Once the identity's rename has happened, the new pair is in place.
		if strings.HasPrefix(at, "rename ") && strings.HasSuffix(at, IdentityFile) {
			renamed = true
		}
	}
}

// With the identity given as files (--tls-cert, --tls-key, --ca), a newer
// renewal of the same node and CA stored in the data directory is loaded
// instead, and nothing else is.
func TestLoadFilesPrefersNewerRenewal(t *testing.T) {
	ca := newCA(t)
	other := newCA(t)
	dir := t.TempDir()
	files := filepath.Join(dir, "etc")
	data := filepath.Join(dir, "data")
	certPath, keyPath, caPath := filepath.Join(files, "edge.crt"), filepath.Join(files, "edge.key"), filepath.Join(files, "ca.pem")
	fileKey, fileCert := issued(t, ca, testNode, time.Hour)
	require.NoError(t, pki.WriteFiles(certPath, fileCert, keyPath, fileKey))
	require.NoError(t, pki.WriteFiles(caPath, ca.Cert, "", nil))

	load := func() (*x509.Certificate, bool) {
		t.Helper()
		_, _, leaf, fromDir, err := LoadFiles(certPath, keyPath, caPath, data)
		require.NoError(t, err)
		return leaf, fromDir
	}
	leaf, fromDir := load()
	require.Equal(t, fileCert.Raw, leaf.Raw, "no renewal stored yet")
	require.False(t, fromDir)

	// Issued later than the files' certificate, as a renewal is.
	later := func(ca *pki.CA, node string, than *x509.Certificate) (crypto.Signer, *x509.Certificate) {
		return issuedAt(t, ca, node, than.NotBefore.Add(time.Minute))
	}
	k, c := later(other, testNode, fileCert)
	require.NoError(t, Store(data, k, c, other.Cert))
	leaf, _ = load()
	require.Equal(t, fileCert.Raw, leaf.Raw, "a renewal from another CA")
	k, c = later(ca, "other-node", fileCert)
	require.NoError(t, Store(data, k, c, ca.Cert))
	leaf, _ = load()
	require.Equal(t, fileCert.Raw, leaf.Raw, "a renewal of another node")

	k, renewed := later(ca, testNode, fileCert)
	require.NoError(t, Store(data, k, renewed, ca.Cert))
	leaf, fromDir = load()
	require.Equal(t, renewed.Raw, leaf.Raw, "the renewal is newer than --tls-cert")
	require.True(t, fromDir)

	// The operator provisions a newer certificate in the files: it wins.
	k, c = later(ca, testNode, renewed)
	require.NoError(t, pki.WriteFiles(certPath, c, keyPath, k))
	leaf, fromDir = load()
	require.Equal(t, c.Raw, leaf.Raw)
	require.False(t, fromDir)
}

func TestRenewAt(t *testing.T) {
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	tests := []struct {
		name      string
		notBefore time.Time
		notAfter  time.Time
		want      time.Time
	}{
		{name: "ten hours", notBefore: start, notAfter: start.Add(10 * time.Hour), want: start.Add(8 * time.Hour)},
		{name: "a year", notBefore: start, notAfter: start.Add(365 * 24 * time.Hour), want: start.Add(292 * 24 * time.Hour)},
		{name: "empty lifetime", notBefore: start, notAfter: start, want: start},
		{name: "inverted", notBefore: start, notAfter: start.Add(-time.Hour), want: start},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := RenewAt(&x509.Certificate{NotBefore: tc.notBefore, NotAfter: tc.notAfter})
			require.True(t, tc.want.Equal(got), "got %s want %s", got, tc.want)
		})
	}
}

func TestCheckUsable(t *testing.T) {
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	leaf := &x509.Certificate{NotBefore: start, NotAfter: start.Add(time.Hour)}
	leaf.Subject.CommonName = testNode
	tests := []struct {
		name    string
		now     time.Time
		wantErr string
		expired bool
	}{
		{name: "valid", now: start.Add(time.Minute)},
		{name: "last instant", now: start.Add(time.Hour)},
		{
			name: "expired", now: start.Add(time.Hour + time.Second), expired: true,
			wantErr: "the node certificate expired at 2026-01-01T01:00:00Z; ask the operator for a new token " +
				"(cloudcore admin allow edge-1) and run edgecore join again",
		},
		{name: "not yet valid", now: start.Add(-time.Second), wantErr: "not valid until 2026-01-01T00:00:00Z"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := CheckUsable(leaf, tc.now)
			if tc.wantErr == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorContains(t, err, tc.wantErr)
			if tc.expired {
				require.EqualError(t, err, tc.wantErr)
				require.ErrorIs(t, err, ErrExpired)
			} else {
				require.NotErrorIs(t, err, ErrExpired)
			}
		})
	}
}
