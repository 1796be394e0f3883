package pki

import (
	"crypto/tls"
	"crypto/x509"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestIssueAndLoad(t *testing.T) {
	ca, err := NewCA("tether test", time.Hour)
	require.NoError(t, err)
	dir := t.TempDir()
	require.NoError(t, WriteFiles(filepath.Join(dir, "ca.crt"), ca.Cert, filepath.Join(dir, "ca.key"), ca.Key))
	loaded, err := LoadCA(filepath.Join(dir, "ca.crt"), filepath.Join(dir, "ca.key"))
	require.NoError(t, err)
	require.True(t, loaded.Cert.Equal(ca.Cert))

	client, key, err := loaded.Issue(LeafRequest{CommonName: "edge-1", Usage: UsageClient, Validity: time.Hour})
	require.NoError(t, err)
	require.NotNil(t, key)
	_, err = client.Verify(x509.VerifyOptions{Roots: ca.Pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	require.NoError(t, err)
	_, err = client.Verify(x509.VerifyOptions{Roots: ca.Pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
	require.Error(t, err, "a client certificate must not serve")

	server, skey, err := ca.Issue(LeafRequest{CommonName: "cloudcore", Usage: UsageServer, Hosts: []string{"127.0.0.1", "cloud.example"}, Validity: time.Hour})
	require.NoError(t, err)
	require.Equal(t, []string{"cloud.example"}, server.DNSNames)
	require.Len(t, server.IPAddresses, 1)
	require.NoError(t, WriteFiles(filepath.Join(dir, "s.crt"), server, filepath.Join(dir, "s.key"), skey))
	st, err := os.Stat(filepath.Join(dir, "s.key"))
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), st.Mode().Perm())
	_, err = tls.LoadX509KeyPair(filepath.Join(dir, "s.crt"), filepath.Join(dir, "s.key"))
	require.NoError(t, err)

	pool, err := LoadPool(filepath.Join(dir, "ca.crt"))
	require.NoError(t, err)
	_, err = server.Verify(x509.VerifyOptions{Roots: pool, DNSName: "cloud.example"})
	require.NoError(t, err)

	_, err = LoadCA(filepath.Join(dir, "s.crt"), filepath.Join(dir, "s.key"))
	require.ErrorContains(t, err, "not a CA")
	_, _, err = ca.Issue(LeafRequest{CommonName: "x"})
	require.Error(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "junk"), []byte("nope"), 0o600))
	_, err = LoadPool(filepath.Join(dir, "junk"))
	require.ErrorContains(t, err, "no PEM certificate")
}
