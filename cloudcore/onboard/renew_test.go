package onboard

import (
	"context"
	"crypto/x509"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
)

type renewFixture struct {
	*cluster
	issuer  *Issuer
	renewer *Renewer
	reg     *prometheus.Registry
}

func newRenewFixture(t *testing.T) *renewFixture {
	t.Helper()
	c := newCluster(t)
	iss := &Issuer{CA: newCA(t)}
	reg := prometheus.NewRegistry()
	r, err := NewRenewer(RenewerConfig{EdgeNodes: c.nodes, Issuer: iss, Logger: testLogger(), Registerer: reg})
	require.NoError(t, err)
	return &renewFixture{cluster: c, issuer: iss, renewer: r, reg: reg}
}

// joined whitelists a node and records a first certificate for it, as a
// join would.
func (f *renewFixture) joined(t *testing.T, prefix string) (string, *x509.Certificate) {
	t.Helper()
	node := f.name(t, prefix)
	_, _, err := Allow(t.Context(), f.nodes, f.issuer.CA.Cert, node, AllowOptions{})
	require.NoError(t, err)
	cert, err := f.issuer.Sign(csrPEM(t, ecKey(t), nil), node)
	require.NoError(t, err)
	require.NoError(t, recordCertificate(t.Context(), f.nodes, nil, node, cert, nil))
	return node, cert
}

func TestRenewCurrentCertificate(t *testing.T) {
	f := newRenewFixture(t)
	node, first := f.joined(t, "renew")
	key := ecKey(t)

	second, err := f.renewer.Renew(t.Context(), node, first.SerialNumber.Text(16), csrPEM(t, key, nil))
	require.NoError(t, err)
	requireClientCert(t, f.issuer.CA, second, node)
	require.True(t, key.PublicKey.Equal(second.PublicKey))
	require.NotEqual(t, first.SerialNumber, second.SerialNumber)

	e := f.get(t, node)
	require.Equal(t, second.SerialNumber.Text(16), e.Status.Certificate.Serial)
	require.True(t, second.NotAfter.Equal(e.Status.Certificate.NotAfter.Time))
	require.Error(t, e.CertificateCurrent(first.SerialNumber.Text(16), time.Now()), "the old certificate is superseded")

	// The superseded certificate cannot renew again.
	before := f.snapshot(t, node)
	_, err = f.renewer.Renew(t.Context(), node, first.SerialNumber.Text(16), csrPEM(t, key, nil))
	require.ErrorIs(t, err, ErrRefused)
	require.ErrorContains(t, err, "not its current one")
	require.Equal(t, before, f.snapshot(t, node))

	require.Equal(t, 1.0, counter(t, f.reg, "tether_cert_renewed_total", nil))
	require.Equal(t, 1.0, counter(t, f.reg, "tether_cert_renew_refused_total", nil))
}

func TestRenewRefusals(t *testing.T) {
	f := newRenewFixture(t)
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T) (node, serial string, csr []byte)
		want  string
	}{
		{
			name: "disabled",
			setup: func(t *testing.T) (string, string, []byte) {
				node, cert := f.joined(t, "renew-disabled")
				_, err := Disable(t.Context(), f.nodes, node)
				require.NoError(t, err)
				return node, cert.SerialNumber.Text(16), csrPEM(t, ecKey(t), nil)
			},
			want: "disabled",
		},
		{
			name: "unknown",
			setup: func(t *testing.T) (string, string, []byte) {
				return f.name(t, "renew-unknown"), "abc", csrPEM(t, ecKey(t), nil)
			},
			want: "not on the whitelist",
		},
		{
			name: "never joined",
			setup: func(t *testing.T) (string, string, []byte) {
				node := f.name(t, "renew-new")
				_, _, err := Allow(t.Context(), f.nodes, f.issuer.CA.Cert, node, AllowOptions{})
				require.NoError(t, err)
				return node, "abc", csrPEM(t, ecKey(t), nil)
			},
			want: "no certificate on record",
		},
		{
			name: "bad request",
			setup: func(t *testing.T) (string, string, []byte) {
				node, cert := f.joined(t, "renew-badcsr")
				return node, cert.SerialNumber.Text(16), []byte("junk")
			},
			want: "bad certificate request",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			node, serial, csr := tc.setup(t)
			before := f.snapshot(t, node)
			cert, err := f.renewer.Renew(t.Context(), node, serial, csr)
			require.Nil(t, cert)
			require.ErrorIs(t, err, ErrRefused)
			require.ErrorContains(t, err, tc.want)
			require.Equal(t, before, f.snapshot(t, node))
		})
	}
}

// Two renewals of the same certificate racing: exactly one is recorded.
func TestRenewConcurrentOnlyOneWins(t *testing.T) {
	f := newRenewFixture(t)
	node, first := f.joined(t, "renew-race")
	const n = 4
	certs := make([]*x509.Certificate, n)
	errs := make([]error, n)
	csrs := make([][]byte, n)
	for i := range csrs {
		csrs[i] = csrPEM(t, ecKey(t), nil)
	}
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			certs[i], errs[i] = f.renewer.Renew(context.Background(), node, first.SerialNumber.Text(16), csrs[i])
		})
	}
	close(start)
	wg.Wait()
	var won *x509.Certificate
	for i := range n {
		if errs[i] == nil {
			require.Nil(t, won, "two renewals of one certificate succeeded")
			won = certs[i]
			continue
		}
		require.ErrorIs(t, errs[i], ErrRefused)
	}
	require.NotNil(t, won)
	require.Equal(t, won.SerialNumber.Text(16), f.get(t, node).Status.Certificate.Serial)
}
