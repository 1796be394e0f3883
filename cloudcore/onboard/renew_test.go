package onboard

import (
	"context"
	"crypto/x509"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/tests/testlog"
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
	r, err := NewRenewer(RenewerConfig{EdgeNodes: c.nodes, Issuer: iss, Logger: testlog.New(), Registerer: reg})
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
	require.NoError(t, recordCertificate(t.Context(), f.nodes, nil, node, joined(cert)))
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
	// The replaced certificate stays accepted, as the previous one, in case
	// the node never got the new one; for the grace at most.
	require.NotNil(t, e.Status.Previous)
	require.Equal(t, first.SerialNumber.Text(16), e.Status.Previous.Serial)
	until, err := e.Accepts(first.SerialNumber.Text(16), time.Now())
	require.NoError(t, err)
	require.WithinDuration(t, time.Now().Add(DefaultRenewGrace), until, time.Minute)

	// The node did not get the second certificate and renews with the
	// first again: it gets a third, the second is dropped, and the grace of
	// the first is not extended.
	third, err := f.renewer.Renew(t.Context(), node, first.SerialNumber.Text(16), csrPEM(t, key, nil))
	require.NoError(t, err)
	e = f.get(t, node)
	require.Equal(t, third.SerialNumber.Text(16), e.Status.Certificate.Serial)
	require.Equal(t, first.SerialNumber.Text(16), e.Status.Previous.Serial)
	require.True(t, until.Equal(e.Status.Previous.NotAfter.Time), "a retry must not extend the grace")

	// The dropped second certificate can neither connect nor renew.
	_, err = e.Accepts(second.SerialNumber.Text(16), time.Now())
	require.ErrorContains(t, err, "not its current one")
	before := f.snapshot(t, node)
	_, err = f.renewer.Renew(t.Context(), node, second.SerialNumber.Text(16), csrPEM(t, key, nil))
	require.ErrorIs(t, err, ErrRefused)
	require.ErrorContains(t, err, "not its current one")
	require.Equal(t, before, f.snapshot(t, node))

	// Renewing with the current one ends the first's acceptance.
	fourth, err := f.renewer.Renew(t.Context(), node, third.SerialNumber.Text(16), csrPEM(t, key, nil))
	require.NoError(t, err)
	e = f.get(t, node)
	require.Equal(t, fourth.SerialNumber.Text(16), e.Status.Certificate.Serial)
	require.Equal(t, third.SerialNumber.Text(16), e.Status.Previous.Serial)
	_, err = e.Accepts(first.SerialNumber.Text(16), time.Now())
	require.Error(t, err)

	require.Equal(t, 3.0, counter(t, f.reg, "tether_cert_renewed_total", nil))
	require.Equal(t, 1.0, counter(t, f.reg, "tether_cert_renew_refused_total", nil))
}

// The grace of the replaced certificate never outlasts its own expiry.
func TestRenewGraceEndsAtExpiry(t *testing.T) {
	c := newCluster(t)
	iss := &Issuer{CA: newCA(t), Validity: time.Hour}
	r, err := NewRenewer(RenewerConfig{EdgeNodes: c.nodes, Issuer: iss, Logger: testlog.New()})
	require.NoError(t, err)
	f := &renewFixture{cluster: c, issuer: iss, renewer: r}
	node, first := f.joined(t, "renew-grace")
	_, err = r.Renew(t.Context(), node, first.SerialNumber.Text(16), csrPEM(t, ecKey(t), nil))
	require.NoError(t, err)
	prev := f.get(t, node).Status.Previous
	require.NotNil(t, prev)
	require.True(t, first.NotAfter.Equal(prev.NotAfter.Time), "grace %s, certificate expires %s", prev.NotAfter, first.NotAfter)
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

// Renewals of the same certificate racing leave a consistent record.
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
	// Each renewal presented an accepted certificate (the first stays
	// accepted as the previous one), so each may succeed; whatever the
	// interleaving, the first is still accepted and the current one is one
	// of those handed out.
	issued := map[string]bool{}
	for i := range n {
		if errs[i] != nil {
			require.ErrorContains(t, errs[i], "still conflicting")
			continue
		}
		issued[certs[i].SerialNumber.Text(16)] = true
	}
	require.NotEmpty(t, issued)
	e := f.get(t, node)
	require.True(t, issued[e.Status.Certificate.Serial], "current %s is not one of the issued %v", e.Status.Certificate.Serial, issued)
	require.Equal(t, first.SerialNumber.Text(16), e.Status.Previous.Serial)
}
