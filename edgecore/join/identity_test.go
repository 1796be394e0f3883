package join

import (
	"crypto/x509"
	"encoding/pem"
	"io/fs"
	"os"
	"path/filepath"
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
	for _, name := range []string{KeyFile, CertFile, CAFile} {
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

	// A renewal replaces the pair; a key left from another pair is caught.
	key2, _, err := NewRenewalKey()
	require.NoError(t, err)
	require.NoError(t, pki.WriteFiles(filepath.Join(dir, "unused.crt"), leaf, filepath.Join(dir, KeyFile), key2))
	_, _, _, err = Load(dir)
	require.ErrorContains(t, err, "load the node identity")

	require.ErrorContains(t, Store(dir, nil, leaf, ca.Cert), "required")
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
