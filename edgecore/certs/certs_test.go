package certs

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/common/pki"
	edgejoin "github.com/tetheredge/tether/edgecore/join"
)

const testNode = "edge-1"

// signer is the cloud's side of a renewal, in process: it signs what it is
// sent with the cluster CA, for the node, as CloudCore's Issuer does.
type signer struct {
	ca       *pki.CA
	node     string
	validity time.Duration
	calls    atomic.Int32
	lose     atomic.Bool // the reply is lost
}

var errLost = errors.New("session closed before the reply")

func (s *signer) renew(_ context.Context, csrPEM []byte) ([]byte, error) {
	s.calls.Add(1)
	block, _ := pem.Decode(csrPEM)
	if block == nil {
		return nil, errors.New("no PEM")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, err
	}
	cert, _, err := s.ca.Issue(pki.LeafRequest{CommonName: s.node, Validity: s.validity, PublicKey: csr.PublicKey})
	if err != nil {
		return nil, err
	}
	if s.lose.Load() {
		return nil, errLost
	}
	return pki.EncodeCert(cert), nil
}

func lost(s *signer) *signer {
	s.lose.Store(true)
	return s
}

// joined stores a first identity in dir, as edgecore join does, and
// returns it.
func joined(t *testing.T, ca *pki.CA, dir string, validity time.Duration) tls.Certificate {
	t.Helper()
	cert, key, err := ca.Issue(pki.LeafRequest{CommonName: testNode, Validity: validity})
	require.NoError(t, err)
	require.NoError(t, edgejoin.Store(dir, key, cert, ca.Cert))
	pair, _, leaf, err := edgejoin.Load(dir)
	require.NoError(t, err)
	pair.Leaf = leaf
	return pair
}

func newCA(t *testing.T) *pki.CA {
	t.Helper()
	ca, err := pki.NewCA("test-ca", 10*365*24*time.Hour)
	require.NoError(t, err)
	return ca
}

func TestRenewOnceInstallsAndStores(t *testing.T) {
	ca := newCA(t)
	dir := t.TempDir()
	first := joined(t, ca, dir, time.Hour)
	h := NewHolder(first)
	s := &signer{ca: ca, node: testNode, validity: time.Hour}
	r := NewRotator(dir, testNode, ca.Cert, h, s.renew, nil, nil)

	require.NoError(t, r.RenewOnce(t.Context()))
	leaf := h.Leaf()
	require.NotEqual(t, first.Leaf.SerialNumber, leaf.SerialNumber)
	got, err := h.GetClientCertificate(nil)
	require.NoError(t, err)
	require.Equal(t, leaf.Raw, got.Certificate[0])
	_, _, stored, err := edgejoin.Load(dir)
	require.NoError(t, err)
	require.Equal(t, leaf.Raw, stored.Raw, "the renewal is on disk for the next start")
}

func TestRenewOnceKeepsOldOnFailure(t *testing.T) {
	ca := newCA(t)
	other := newCA(t)
	for _, tc := range []struct {
		name string
		s    *signer
		want string
	}{
		{name: "reply lost", s: lost(&signer{ca: ca, node: testNode, validity: time.Hour}), want: "session closed"},
		{name: "another node's certificate", s: &signer{ca: ca, node: "edge-2", validity: time.Hour}, want: "not for this node"},
		{name: "another CA", s: &signer{ca: other, node: testNode, validity: time.Hour}, want: "not signed by the cluster CA"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			first := joined(t, ca, dir, time.Hour)
			h := NewHolder(first)
			r := NewRotator(dir, testNode, ca.Cert, h, tc.s.renew, nil, nil)
			require.ErrorContains(t, r.RenewOnce(t.Context()), tc.want)
			require.Equal(t, first.Leaf.Raw, h.Leaf().Raw)
			_, _, stored, err := edgejoin.Load(dir)
			require.NoError(t, err)
			require.Equal(t, first.Leaf.Raw, stored.Raw)
		})
	}
}

// A renewal that cannot be stored (a file stands where the directory
// should be, which fails even for root) changes nothing: the held certificate and the stored one stay the old.
func TestRenewOnceStoreFails(t *testing.T) {
	ca := newCA(t)
	dir := t.TempDir()
	first := joined(t, ca, dir, time.Hour)
	h := NewHolder(first)
	s := &signer{ca: ca, node: testNode, validity: time.Hour}
	blocked := filepath.Join(t.TempDir(), "file")
	require.NoError(t, os.WriteFile(blocked, nil, 0o600))
	r := NewRotator(filepath.Join(blocked, "sub"), testNode, ca.Cert, h, s.renew, nil, nil)
	require.Error(t, r.RenewOnce(t.Context()))
	require.Equal(t, first.Leaf.Raw, h.Leaf().Raw, "a renewal that was not stored must not be presented")
}

// Run renews at 80 % of the lifetime, and retries a failed renewal before
// the certificate expires.
func TestRunRenewsOnSchedule(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ca := newCA(t)
		dir := t.TempDir()
		first := joined(t, ca, dir, 10*time.Hour)
		h := NewHolder(first)
		s := lost(&signer{ca: ca, node: testNode, validity: 10 * time.Hour})
		r := NewRotator(dir, testNode, ca.Cert, h, s.renew, nil, nil)
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- r.Run(ctx) }()

		due := edgejoin.RenewAt(first.Leaf)
		time.Sleep(time.Until(due) - time.Second)
		synctest.Wait()
		require.Zero(t, s.calls.Load(), "renewed before 80 %% of the lifetime")

		time.Sleep(2 * time.Second)
		synctest.Wait()
		require.Equal(t, int32(1), s.calls.Load())
		require.Equal(t, first.Leaf.Raw, h.Leaf().Raw, "the lost reply changed nothing")

		// Retried within the remaining lifetime; this time the reply
		// arrives.
		s.lose.Store(false)
		time.Sleep(30 * time.Second)
		synctest.Wait()
		require.Equal(t, int32(2), s.calls.Load())
		require.NotEqual(t, first.Leaf.SerialNumber, h.Leaf().SerialNumber)

		cancel()
		require.NoError(t, <-done)
	})
}
