package main

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/common/pki"
	"github.com/tetheredge/tether/edgecore/certs"
	"github.com/tetheredge/tether/edgecore/config"
)

// With --tls-cert, --tls-key and --ca, a certificate renewed while running
// is the one the next start loads, and the given files are left as they
// were.
func TestTLSCertFlagsLoadRenewedPair(t *testing.T) {
	ca, err := pki.NewCA("test-ca", 24*time.Hour)
	require.NoError(t, err)
	etc, data := t.TempDir(), t.TempDir()
	f := config.Default()
	f.Tunnel.Cloud = []string{"127.0.0.1:1"}
	f.Node = config.Node{
		Name: "edge-1", DataDir: data,
		TLSCert: filepath.Join(etc, "edge.crt"), TLSKey: filepath.Join(etc, "edge.key"), CA: filepath.Join(etc, "ca.pem"),
	}
	first, key, err := ca.Issue(pki.LeafRequest{CommonName: f.Node.Name, Validity: time.Hour})
	require.NoError(t, err)
	require.NoError(t, pki.WriteFiles(f.Node.TLSCert, first, f.Node.TLSKey, key))
	require.NoError(t, pki.WriteFiles(f.Node.CA, ca.Cert, "", nil))
	logger := slog.New(slog.DiscardHandler)

	cfg, err := appConfig(f, logger)
	require.NoError(t, err)
	require.Equal(t, first.Raw, cfg.Certificate.Leaf.Raw)

	// The running EdgeCore renews, as cmd wires it.
	holder := certs.NewHolder(cfg.Certificate)
	sign := func(_ context.Context, csrPEM []byte) ([]byte, error) {
		block, _ := pem.Decode(csrPEM)
		if block == nil {
			return nil, errors.New("no PEM")
		}
		csr, err := x509.ParseCertificateRequest(block.Bytes)
		if err != nil {
			return nil, err
		}
		// Issued a moment later than the first, as a renewal is.
		c, _, err := ca.Issue(pki.LeafRequest{CommonName: f.Node.Name, Validity: 2 * time.Hour, PublicKey: csr.PublicKey})
		return pki.EncodeCert(c), err
	}
	require.NoError(t, certs.NewRotator(cfg.IdentityDir, f.Node.Name, cfg.CA, holder, sign, logger, nil).RenewOnce(t.Context()))
	renewed := holder.Leaf()

	// Next start, same flags.
	cfg, err = appConfig(f, logger)
	require.NoError(t, err)
	require.Equal(t, renewed.Raw, cfg.Certificate.Leaf.Raw, "the next start loaded the certificate the renewal replaced")
	given, err := pki.LoadPool(f.Node.CA)
	require.NoError(t, err)
	require.NotNil(t, given)
}
