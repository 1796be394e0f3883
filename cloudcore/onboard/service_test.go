package onboard

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tetheredge/tether/common/join"
	"github.com/tetheredge/tether/common/pki"
	"github.com/tetheredge/tether/tests/testlog"
)

// joinServer is a Service on a real loopback HTTPS listener, with a real
// client that trusts only the cluster CA, as a joining node does.
type joinServer struct {
	*cluster
	ca     *pki.CA
	svc    *Service
	reg    *prometheus.Registry
	base   string
	client *http.Client
}

// startJoinServer starts the service; opts change its Config (the tests
// that do not test the rate limit get one that does not get in the way).
func startJoinServer(t *testing.T, opts ...func(*cluster, *Config)) *joinServer {
	t.Helper()
	c := newCluster(t)
	ca := newCA(t)
	serverCert, err := ServerCertificate(ca, []string{"127.0.0.1"}, time.Hour)
	require.NoError(t, err)
	reg := prometheus.NewRegistry()
	cfg := Config{
		Addr:        "127.0.0.1:0",
		TLS:         &tls.Config{Certificates: []tls.Certificate{serverCert}},
		EdgeNodes:   c.nodes,
		Issuer:      &Issuer{CA: ca},
		SourceBurst: 1000,
		Logger:      testlog.New(),
		Registerer:  reg,
	}
	for _, o := range opts {
		o(c, &cfg)
	}
	svc, err := New(cfg)
	require.NoError(t, err)
	require.NoError(t, svc.Listen())

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- svc.Run(ctx) }()
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.Pool(), MinVersion: tls.VersionTLS13}, ForceAttemptHTTP2: true}
	t.Cleanup(func() {
		tr.CloseIdleConnections()
		cancel()
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-time.After(30 * time.Second):
			t.Errorf("Run did not return after its context ended")
		}
	})
	return &joinServer{
		cluster: c, ca: ca, svc: svc, reg: reg,
		base:   "https://" + svc.Addr().String(),
		client: &http.Client{Transport: tr, Timeout: 30 * time.Second},
	}
}

// allow whitelists a fresh node and returns its name and token.
func (s *joinServer) allow(t *testing.T, prefix string, opts AllowOptions) (string, join.Token) {
	t.Helper()
	node := s.name(t, prefix)
	tok, _, err := Allow(t.Context(), s.nodes, s.ca.Cert, node, opts)
	require.NoError(t, err)
	return node, tok
}

func (s *joinServer) post(t *testing.T, body []byte) (int, join.Response) {
	t.Helper()
	resp, err := s.client.Post(s.base+join.PathJoin, "application/json", bytes.NewReader(body))
	require.NoError(t, err)
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	var out join.Response
	require.NoError(t, json.Unmarshal(raw, &out), "body %q", raw)
	return resp.StatusCode, out
}

func (s *joinServer) join(t *testing.T, node string, token string, csr []byte) (int, join.Response) {
	t.Helper()
	body, err := json.Marshal(join.Request{Node: node, Token: token, CSR: string(csr)})
	require.NoError(t, err)
	return s.post(t, body)
}

func (s *joinServer) refusals(t *testing.T, reason string) float64 {
	t.Helper()
	return counter(t, s.reg, "tether_join_refused_total", map[string]string{"reason": reason})
}

func parseCert(t *testing.T, p string) *x509.Certificate {
	t.Helper()
	block, rest := pem.Decode([]byte(p))
	require.NotNil(t, block)
	require.Empty(t, bytes.TrimSpace(rest))
	require.Equal(t, "CERTIFICATE", block.Type)
	cert, err := x509.ParseCertificate(block.Bytes)
	require.NoError(t, err)
	return cert
}

func TestJoinSucceeds(t *testing.T) {
	s := startJoinServer(t)
	node, tok := s.allow(t, "edge-ok", AllowOptions{Labels: map[string]string{"site": "a"}})

	// The node downloads the CA and checks it against its token first.
	resp, err := s.client.Get(s.base + join.PathCA)
	require.NoError(t, err)
	caPEM, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	require.NoError(t, resp.Body.Close())
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, pki.EncodeCert(s.ca.Cert), caPEM)
	require.NoError(t, tok.VerifyCA(parseCert(t, string(caPEM))))

	key := ecKey(t)
	status, out := s.join(t, node, tok.String(), csrPEM(t, key, nil))
	require.Equal(t, http.StatusOK, status, out.Error)
	require.Empty(t, out.Error)
	require.Equal(t, string(caPEM), out.CA)
	cert := parseCert(t, out.Certificate)
	requireClientCert(t, s.ca, cert, node)
	require.True(t, key.PublicKey.Equal(cert.PublicKey))

	e := s.get(t, node)
	require.Nil(t, e.Spec.Join, "the token is used up")
	require.True(t, e.Spec.Allowed)
	require.Equal(t, map[string]string{"site": "a"}, e.Spec.Labels)
	require.NotNil(t, e.Status.Certificate)
	require.Equal(t, cert.SerialNumber.Text(16), e.Status.Certificate.Serial)
	require.True(t, cert.NotAfter.Equal(e.Status.Certificate.NotAfter.Time))
	// What the tunnel's whitelist will check at connection time.
	_, err = e.Accepts(cert.SerialNumber.Text(16), time.Now())
	require.NoError(t, err)

	require.Equal(t, 1.0, counter(t, s.reg, "tether_join_total", nil))
	require.Equal(t, 0.0, counter(t, s.reg, "tether_join_refused_total", nil))
}

// Every refusal answers a clear sentence, counts its reason and leaves the
// EdgeNode (or its absence) exactly as it was.
func TestJoinRefusals(t *testing.T) {
	s := startJoinServer(t)
	ctx := t.Context()

	type attempt struct {
		node, token string
		csr         []byte
		watch       []string // EdgeNodes that must not change
	}
	good := func() []byte { return csrPEM(t, ecKey(t), nil) }

	for _, tc := range []struct {
		name       string
		setup      func(t *testing.T) attempt
		status     int
		reason     string
		want       []string
		afterwards func(t *testing.T, a attempt)
	}{
		{
			name: "malformed token",
			setup: func(t *testing.T) attempt {
				node, _ := s.allow(t, "malformed", AllowOptions{})
				return attempt{node: node, token: "tj1.not-a-token", csr: good(), watch: []string{node}}
			},
			status: http.StatusBadRequest, reason: reasonMalformedToken,
			want: []string{"malformed token"},
		},
		{
			name: "forged secret",
			setup: func(t *testing.T) attempt {
				node, tok := s.allow(t, "forged", AllowOptions{})
				forged, err := join.NewToken(s.ca.Cert)
				require.NoError(t, err)
				tok.Secret = forged.Secret
				return attempt{node: node, token: tok.String(), csr: good(), watch: []string{node}}
			},
			status: http.StatusForbidden, reason: reasonInvalidToken,
			want: []string{"token is not valid (or already used) for node forged-"},
		},
		{
			name: "token of another node",
			setup: func(t *testing.T) attempt {
				a, tokA := s.allow(t, "node-a", AllowOptions{})
				b, _ := s.allow(t, "node-b", AllowOptions{})
				return attempt{node: b, token: tokA.String(), csr: good(), watch: []string{a, b}}
			},
			status: http.StatusForbidden, reason: reasonInvalidToken,
			want: []string{"token is not valid (or already used) for node node-b-"},
		},
		{
			name: "token superseded by a new allow",
			setup: func(t *testing.T) attempt {
				node, old := s.allow(t, "superseded", AllowOptions{})
				_, _, err := Allow(ctx, s.nodes, s.ca.Cert, node, AllowOptions{})
				require.NoError(t, err)
				return attempt{node: node, token: old.String(), csr: good(), watch: []string{node}}
			},
			status: http.StatusForbidden, reason: reasonInvalidToken,
			want: []string{"token is not valid (or already used)"},
		},
		{
			name: "expired token",
			setup: func(t *testing.T) attempt {
				past := func() time.Time { return time.Now().Add(-48 * time.Hour) }
				node, tok := s.allow(t, "expired", AllowOptions{Now: past})
				return attempt{node: node, token: tok.String(), csr: good(), watch: []string{node}}
			},
			status: http.StatusForbidden, reason: reasonExpiredToken,
			want: []string{"token expired at ", "; issue a new one with cloudcore admin allow expired-"},
		},
		{
			name: "reused token",
			setup: func(t *testing.T) attempt {
				node, tok := s.allow(t, "reused", AllowOptions{})
				status, out := s.join(t, node, tok.String(), good())
				require.Equal(t, http.StatusOK, status, out.Error)
				return attempt{node: node, token: tok.String(), csr: good(), watch: []string{node}}
			},
			status: http.StatusForbidden, reason: reasonInvalidToken,
			want: []string{"token is not valid (or already used) for node reused-"},
		},
		{
			name: "disabled node",
			setup: func(t *testing.T) attempt {
				node, tok := s.allow(t, "disabled", AllowOptions{})
				// Disabled behind Disable's back, keeping the token: being
				// disabled is checked before the token.
				e := s.get(t, node)
				e.Spec.Allowed = false
				_, err := s.nodes.Update(ctx, e)
				require.NoError(t, err)
				return attempt{node: node, token: tok.String(), csr: good(), watch: []string{node}}
			},
			status: http.StatusForbidden, reason: reasonDisabled,
			want: []string{"node disabled-", " is disabled"},
		},
		{
			name: "unknown node",
			setup: func(t *testing.T) attempt {
				tok, err := join.NewToken(s.ca.Cert)
				require.NoError(t, err)
				node := s.name(t, "unknown")
				return attempt{node: node, token: tok.String(), csr: good(), watch: []string{node}}
			},
			status: http.StatusForbidden, reason: reasonUnknownNode,
			want: []string{"node unknown-", " is not on the whitelist"},
		},
		{
			name: "token for another cluster CA",
			setup: func(t *testing.T) attempt {
				node, tok := s.allow(t, "wrong-ca", AllowOptions{})
				tok.CAHash = join.CAHash(newCA(t).Cert)
				return attempt{node: node, token: tok.String(), csr: good(), watch: []string{node}}
			},
			status: http.StatusForbidden, reason: reasonWrongCA,
			want: []string{"token was issued for another cluster CA"},
		},
		{
			name: "bad certificate request",
			setup: func(t *testing.T) attempt {
				node, tok := s.allow(t, "bad-csr", AllowOptions{})
				return attempt{node: node, token: tok.String(), csr: []byte("not a request"), watch: []string{node}}
			},
			status: http.StatusBadRequest, reason: reasonBadCSR,
			want: []string{"bad certificate request", "not PEM"},
			afterwards: func(t *testing.T, a attempt) {
				// The token was not used: the node can try again.
				status, out := s.join(t, a.node, a.token, good())
				require.Equal(t, http.StatusOK, status, out.Error)
				requireClientCert(t, s.ca, parseCert(t, out.Certificate), a.node)
			},
		},
		{
			name: "invalid node name",
			setup: func(t *testing.T) attempt {
				tok, err := join.NewToken(s.ca.Cert)
				require.NoError(t, err)
				return attempt{node: "../../namespaces", token: tok.String(), csr: good()}
			},
			status: http.StatusBadRequest, reason: reasonMalformedRequest,
			want: []string{"malformed request", "invalid"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := tc.setup(t)
			before := make([]snapshot, len(a.watch))
			for i, n := range a.watch {
				before[i] = s.snapshot(t, n)
			}
			refusedBefore := s.refusals(t, tc.reason)
			joinedBefore := counter(t, s.reg, "tether_join_total", nil)

			status, out := s.join(t, a.node, a.token, a.csr)
			require.Equal(t, tc.status, status)
			require.Empty(t, out.Certificate)
			for _, w := range tc.want {
				require.Contains(t, out.Error, w)
			}
			require.Equal(t, refusedBefore+1, s.refusals(t, tc.reason))
			require.Equal(t, joinedBefore, counter(t, s.reg, "tether_join_total", nil))
			for i, n := range a.watch {
				require.Equal(t, before[i], s.snapshot(t, n), "EdgeNode %s changed", n)
			}
			if tc.afterwards != nil {
				tc.afterwards(t, a)
			}
		})
	}
}

func TestJoinMalformedHTTP(t *testing.T) {
	s := startJoinServer(t)

	status, out := s.post(t, []byte("{not json"))
	require.Equal(t, http.StatusBadRequest, status)
	require.Contains(t, out.Error, "malformed request")

	big := []byte(`{"node":"x","token":"` + strings.Repeat("a", MaxRequestBytes) + `"}`)
	status, out = s.post(t, big)
	require.Equal(t, http.StatusRequestEntityTooLarge, status)
	require.Contains(t, out.Error, "larger than")
	require.Equal(t, 2.0, s.refusals(t, reasonMalformedRequest))

	resp, err := s.client.Get(s.base + join.PathJoin)
	require.NoError(t, err)
	require.NoError(t, resp.Body.Close())
	require.Equal(t, http.StatusMethodNotAllowed, resp.StatusCode)

	// TLS 1.2 is refused.
	old := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{
		RootCAs: s.ca.Pool(), MinVersion: tls.VersionTLS12, MaxVersion: tls.VersionTLS12,
	}}}
	_, err = old.Get(s.base + join.PathCA)
	require.Error(t, err)
	old.CloseIdleConnections()
}

// Of several joins racing with one token, exactly one gets a certificate,
// and that is the one on record.
func TestJoinConcurrentUseOfOneToken(t *testing.T) {
	s := startJoinServer(t)
	node, tok := s.allow(t, "race", AllowOptions{})

	const n = 6
	csrs := make([][]byte, n)
	for i := range csrs {
		csrs[i] = csrPEM(t, ecKey(t), nil)
	}
	type result struct {
		status int
		out    join.Response
	}
	results := make([]result, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			body, err := json.Marshal(join.Request{Node: node, Token: tok.String(), CSR: string(csrs[i])})
			if err != nil {
				panic(err)
			}
			resp, err := s.client.Post(s.base+join.PathJoin, "application/json", bytes.NewReader(body))
			if err != nil {
				results[i].status = -1
				results[i].out.Error = err.Error()
				return
			}
			defer resp.Body.Close()
			results[i].status = resp.StatusCode
			_ = json.NewDecoder(resp.Body).Decode(&results[i].out)
		})
	}
	close(start)
	wg.Wait()

	var winner *x509.Certificate
	for _, r := range results {
		switch r.status {
		case http.StatusOK:
			require.Nil(t, winner, "two joins succeeded with one token")
			winner = parseCert(t, r.out.Certificate)
		case http.StatusForbidden:
			require.Regexp(t, `token already used|not valid \(or already used\)`, r.out.Error)
		default:
			t.Fatalf("unexpected answer %d: %s", r.status, r.out.Error)
		}
	}
	require.NotNil(t, winner, "no join succeeded")
	e := s.get(t, node)
	require.Equal(t, winner.SerialNumber.Text(16), e.Status.Certificate.Serial)
	require.Nil(t, e.Spec.Join)
	require.Equal(t, 1.0, counter(t, s.reg, "tether_join_total", nil))
	require.Equal(t, float64(n-1), s.refusals(t, reasonInvalidToken)+s.refusals(t, reasonTokenUsed))
}

// A status write by someone else (the whitelist recording a connection)
// between the check and the use of the token does not make a valid join
// fail.
func TestJoinSurvivesUnrelatedStatusWrite(t *testing.T) {
	s := startJoinServer(t)
	node, tok := s.allow(t, "busy", AllowOptions{})
	e := s.get(t, node)
	require.NoError(t, s.svc.checkToken(e, tok))

	// The object changes after the join read it.
	other := s.get(t, node)
	now := metav1.NewTime(time.Now())
	other.Status.LastConnected = &now
	_, err := s.nodes.UpdateStatus(t.Context(), other)
	require.NoError(t, err)

	used, err := s.svc.useToken(t.Context(), e, tok)
	require.NoError(t, err)
	require.Nil(t, used.Spec.Join)
	require.NotNil(t, used.Status.LastConnected, "the other writer's change is kept")

	// A join that checked the token before it was used loses the race.
	_, err = s.svc.useToken(t.Context(), e, tok)
	require.ErrorContains(t, err, "token already used")
}

func TestNewValidatesConfig(t *testing.T) {
	c := newCluster(t)
	ca := newCA(t)
	serverCert, err := ServerCertificate(ca, []string{"127.0.0.1"}, time.Hour)
	require.NoError(t, err)
	tlsCfg := &tls.Config{Certificates: []tls.Certificate{serverCert}}
	for _, cfg := range []Config{
		{EdgeNodes: c.nodes, Issuer: &Issuer{CA: ca}},
		{TLS: tlsCfg, Issuer: &Issuer{CA: ca}},
		{TLS: tlsCfg, EdgeNodes: c.nodes},
		{TLS: tlsCfg, EdgeNodes: c.nodes, Issuer: &Issuer{}},
	} {
		_, err := New(cfg)
		require.Error(t, err)
	}
	reg := prometheus.NewRegistry()
	cfg := Config{TLS: tlsCfg, EdgeNodes: c.nodes, Issuer: &Issuer{CA: ca}, Registerer: reg}
	svc, err := New(cfg)
	require.NoError(t, err)
	require.Nil(t, svc.Addr())
	require.Equal(t, DefaultAddr, svc.cfg.Addr)
	require.Equal(t, uint16(0), tlsCfg.MinVersion, "the caller's TLS config is not modified")
	_, err = New(cfg)
	require.ErrorContains(t, err, "register metrics")
}
