package certs

import (
	"crypto/tls"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/common/pki"
)

// The expiry gauge follows the certificate the holder presents.
func TestExpiryMetric(t *testing.T) {
	ca, err := pki.NewCA("test", time.Hour)
	require.NoError(t, err)
	issue := func(validity time.Duration) tls.Certificate {
		cert, key, err := ca.Issue(pki.LeafRequest{CommonName: testNode, Validity: validity})
		require.NoError(t, err)
		return tls.Certificate{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert}
	}
	expiry := func(reg *prometheus.Registry) float64 {
		t.Helper()
		mfs, err := reg.Gather()
		require.NoError(t, err)
		require.Len(t, mfs, 1)
		require.Equal(t, "tether_edge_certificate_expiry_timestamp_seconds", mfs[0].GetName())
		return mfs[0].GetMetric()[0].GetGauge().GetValue()
	}
	first := issue(10 * time.Minute)
	h := NewHolder(first)
	reg := prometheus.NewRegistry()
	require.NoError(t, h.Register(reg))
	require.Equal(t, float64(first.Leaf.NotAfter.Unix()), expiry(reg))
	renewed := issue(30 * time.Minute)
	h.Set(renewed)
	require.Equal(t, float64(renewed.Leaf.NotAfter.Unix()), expiry(reg))
	require.Error(t, h.Register(reg), "a second registration is an error, returned")
}
