package onboard

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"

	"github.com/tetheredge/tether/cloudcore/edgenode"
	"github.com/tetheredge/tether/common/join"
)

// countingTransport counts the API requests on EdgeNodes.
type countingTransport struct {
	next http.RoundTripper
	n    *atomic.Int64
}

func (c countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if strings.Contains(r.URL.Path, "/edgenodes") {
		c.n.Add(1)
	}
	return c.next.RoundTrip(r)
}

// A flood of well-formed join requests from one source gets 429 beyond
// its burst, and costs no API request beyond it; a join from another
// source still succeeds.
func TestJoinFloodFromOneSource(t *testing.T) {
	var apiRequests atomic.Int64
	const burst, flood = 3, 40
	now := time.Now() // frozen: no bucket refills during the test
	s := startJoinServer(t, func(c *cluster, cfg *Config) {
		rc := rest.CopyConfig(c.cfg)
		rc.Wrap(func(rt http.RoundTripper) http.RoundTripper { return countingTransport{next: rt, n: &apiRequests} })
		dyn, err := dynamic.NewForConfig(rc)
		require.NoError(t, err)
		cfg.EdgeNodes = edgenode.NewClient(dyn)
		cfg.SourceBurst = burst
		cfg.Now = func() time.Time { return now }
	})
	node, tok := s.allow(t, "flood", AllowOptions{})
	// Well-formed, for this cluster's CA and an allowed node, with a wrong
	// secret: each one that gets through costs a read of the EdgeNode.
	forged := tok
	forged.Secret = strings.Repeat("x", len(tok.Secret))
	attacker := sourceClient(t, s, "127.0.0.1")
	codes := map[int]int{}
	for range flood {
		code, _ := postJoin(t, attacker, s.base, join.Request{Node: node, Token: forged.String(), CSR: string(csrPEM(t, ecKey(t), nil))})
		codes[code]++
	}
	require.Equal(t, map[int]int{http.StatusForbidden: burst, http.StatusTooManyRequests: flood - burst}, codes)
	require.Equal(t, int64(burst), apiRequests.Load(), "API requests made for the flood")
	require.Equal(t, float64(flood-burst), s.refusals(t, reasonRateLimited))

	// The real node, from another address, joins.
	code, out := postJoin(t, sourceClient(t, s, "127.0.0.2"), s.base,
		join.Request{Node: node, Token: tok.String(), CSR: string(csrPEM(t, ecKey(t), nil))})
	require.Equal(t, http.StatusOK, code, out.Error)
}

func TestSourceOf(t *testing.T) {
	require.Equal(t, sourceOf("192.0.2.1:5"), sourceOf("192.0.2.1:6"))
	require.NotEqual(t, sourceOf("192.0.2.1:5"), sourceOf("192.0.2.2:5"))
	require.Equal(t, sourceOf("[2001:db8:1:2::1]:5"), sourceOf("[2001:db8:1:2:ffff::9]:7"), "one /64")
	require.NotEqual(t, sourceOf("[2001:db8:1:2::1]:5"), sourceOf("[2001:db8:1:3::1]:5"))
	require.Equal(t, sourceOf("[::ffff:192.0.2.1]:5"), sourceOf("192.0.2.1:5"))
}

// The map of sources stays bounded: past its size, refilled sources are
// forgotten and the rest share one bucket.
func TestSourceLimiterBounded(t *testing.T) {
	l := newSourceLimiter(1, 2, 4)
	now := time.Now()
	for i := range 4 {
		require.True(t, l.allow(net.JoinHostPort(net.IPv4(10, 0, 0, byte(i)).String(), "1"), now))
	}
	// Full: new sources share the overflow bucket (burst 2).
	require.True(t, l.allow("10.0.1.1:1", now))
	require.True(t, l.allow("10.0.1.2:1", now))
	require.False(t, l.allow("10.0.1.3:1", now))
	require.Len(t, l.sources, 4)
	// Once the remembered ones have refilled, they make room.
	later := now.Add(2 * time.Second)
	require.True(t, l.allow("10.0.1.3:1", later))
	require.Len(t, l.sources, 1)
}

// sourceClient is a client whose connections come from the loopback
// address local.
func sourceClient(t *testing.T, s *joinServer, local string) *http.Client {
	t.Helper()
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(local)}}
	tr := &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: s.ca.Pool(), MinVersion: tls.VersionTLS13},
		DialContext:     d.DialContext,
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 30 * time.Second}
}

func postJoin(t *testing.T, c *http.Client, base string, req join.Request) (int, join.Response) {
	t.Helper()
	body, err := json.Marshal(req)
	require.NoError(t, err)
	resp, err := c.Post(base+join.PathJoin, "application/json", bytes.NewReader(body))
	require.NoError(t, err)
	defer resp.Body.Close()
	var out join.Response
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&out))
	return resp.StatusCode, out
}
