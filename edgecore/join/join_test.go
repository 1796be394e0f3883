package join

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"io/fs"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	joinapi "github.com/tetheredge/tether/common/join"
	"github.com/tetheredge/tether/common/pki"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

const testNode = "edge-1"

// issueFunc makes the certificate PEM the fake cloud returns for a CSR.
type issueFunc func(t *testing.T, ca *pki.CA, csr *x509.CertificateRequest) []byte

// cloudOpts makes the fake cloud misbehave.
type cloudOpts struct {
	// servedCA is served at PathCA instead of the cluster CA.
	servedCA *x509.Certificate
	// tlsCA signs the server's TLS certificate instead of the cluster CA.
	tlsCA *pki.CA
	// tlsHosts are the names in the server's TLS certificate. Default
	// 127.0.0.1.
	tlsHosts []string
	// refuse answers the join with 403 and this reason.
	refuse string
	// issue replaces the proper client certificate.
	issue issueFunc
	// caBody and joinBody replace the answers' bodies.
	caBody, joinBody []byte
}

// fakeCloud stands in for CloudCore's join service, which is built
// elsewhere: a real HTTPS server on loopback that serves the cluster CA and
// signs CSRs for one token with a minimal policy. It records the join
// requests it received.
type fakeCloud struct {
	t     *testing.T
	ca    *pki.CA
	token joinapi.Token
	opts  cloudOpts
	srv   *httptest.Server

	mu    sync.Mutex
	joins []joinapi.Request
	raw   []string
}

func newFakeCloud(t *testing.T, ca *pki.CA, opts cloudOpts) *fakeCloud {
	t.Helper()
	tok, err := joinapi.NewToken(ca.Cert)
	require.NoError(t, err)
	c := &fakeCloud{t: t, ca: ca, token: tok, opts: opts}
	tlsCA := opts.tlsCA
	if tlsCA == nil {
		tlsCA = ca
	}
	hosts := opts.tlsHosts
	if hosts == nil {
		hosts = []string{"127.0.0.1"}
	}
	cert, key, err := tlsCA.Issue(pki.LeafRequest{CommonName: "cloudcore", Usage: pki.UsageServer, Hosts: hosts, Validity: time.Hour})
	require.NoError(t, err)
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+joinapi.PathCA, c.serveCA)
	mux.HandleFunc("POST "+joinapi.PathJoin, c.serveJoin)
	c.srv = httptest.NewUnstartedServer(mux)
	c.srv.TLS = &tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert}},
		MinVersion:   tls.VersionTLS13,
	}
	c.srv.StartTLS()
	t.Cleanup(c.srv.Close)
	return c
}

func (c *fakeCloud) addr() string { return c.srv.Listener.Addr().String() }

func (c *fakeCloud) joinCount() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.joins)
}

func (c *fakeCloud) serveCA(w http.ResponseWriter, _ *http.Request) {
	switch {
	case c.opts.caBody != nil:
		_, _ = w.Write(c.opts.caBody)
	case c.opts.servedCA != nil:
		_, _ = w.Write(pki.EncodeCert(c.opts.servedCA))
	default:
		_, _ = w.Write(pki.EncodeCert(c.ca.Cert))
	}
}

func (c *fakeCloud) serveJoin(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	var req joinapi.Request
	if err := json.Unmarshal(body, &req); err != nil {
		c.answer(w, http.StatusBadRequest, joinapi.Response{Error: "bad request"})
		return
	}
	c.mu.Lock()
	c.joins = append(c.joins, req)
	c.raw = append(c.raw, string(body))
	c.mu.Unlock()
	if c.opts.joinBody != nil {
		_, _ = w.Write(c.opts.joinBody)
		return
	}
	if c.opts.refuse != "" {
		c.answer(w, http.StatusForbidden, joinapi.Response{Error: c.opts.refuse})
		return
	}
	if req.Token != c.token.String() || req.Node != testNode {
		c.answer(w, http.StatusForbidden, joinapi.Response{Error: "token not valid for this node"})
		return
	}
	block, _ := pem.Decode([]byte(req.CSR))
	if block == nil || block.Type != "CERTIFICATE REQUEST" {
		c.answer(w, http.StatusBadRequest, joinapi.Response{Error: "no CSR"})
		return
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err == nil {
		err = csr.CheckSignature()
	}
	if err != nil {
		c.answer(w, http.StatusBadRequest, joinapi.Response{Error: "bad CSR"})
		return
	}
	issue := c.opts.issue
	if issue == nil {
		issue = issueClient(testNode, pki.UsageClient)
	}
	c.answer(w, http.StatusOK, joinapi.Response{Certificate: string(issue(c.t, c.ca, csr)), CA: string(pki.EncodeCert(c.ca.Cert))})
}

func (c *fakeCloud) answer(w http.ResponseWriter, status int, resp joinapi.Response) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(resp)
}

func newCA(t *testing.T) *pki.CA {
	t.Helper()
	ca, err := pki.NewCA("tether test CA", 24*time.Hour)
	require.NoError(t, err)
	return ca
}

// issueClient certifies the CSR's key with the given name and usage.
func issueClient(cn string, usage pki.Usage) issueFunc {
	return func(t *testing.T, ca *pki.CA, csr *x509.CertificateRequest) []byte {
		cert, _, err := ca.Issue(pki.LeafRequest{CommonName: cn, Usage: usage, Hosts: []string{"x"}, Validity: time.Hour, PublicKey: csr.PublicKey})
		require.NoError(t, err)
		return pki.EncodeCert(cert)
	}
}

// signLeaf signs a client certificate for pub with the given validity,
// which pki.Issue cannot put in the past.
func signLeaf(t *testing.T, ca *pki.CA, cn string, pub any, notBefore, notAfter time.Time) []byte {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(42),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    notBefore,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, pub, ca.Key)
	require.NoError(t, err)
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func newKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	return k
}

// requireNothingStored checks that no identity file is in dir.
func requireNothingStored(t *testing.T, dir string) {
	t.Helper()
	for _, name := range []string{IdentityFile, KeyFile, CertFile, CAFile} {
		_, err := os.Stat(filepath.Join(dir, name))
		require.ErrorIs(t, err, fs.ErrNotExist, name)
	}
}

func TestJoin(t *testing.T) {
	ca := newCA(t)
	other := newCA(t)
	tests := []struct {
		name string
		opts cloudOpts
		// token replaces the fake cloud's token.
		token string
		// existingKey puts a node.key in the directory first.
		existingKey bool
		force       bool
		// wantErr is a substring of the error; empty means success.
		wantErr string
		// wantIs is a sentinel the error must wrap.
		wantIs error
		// wantJoins is how many join requests the cloud must have seen.
		wantJoins int
	}{
		{name: "success", wantJoins: 1},
		{name: "malformed token", token: "tj1.nope", wantErr: "token is malformed", wantIs: joinapi.ErrBadToken},
		{
			name: "CA hash mismatch", opts: cloudOpts{servedCA: other.Cert},
			wantErr: "the cluster CA does not match the token (got sha256:" + joinapi.CAHash(other.Cert) +
				", expected sha256:" + joinapi.CAHash(ca.Cert) + "): you may be talking to the wrong server or an attacker",
			wantIs: joinapi.ErrCAMismatch,
		},
		{name: "CA download is not PEM", opts: cloudOpts{caBody: []byte("hello")}, wantErr: "no PEM certificate"},
		{
			name: "CA download holds two certificates", opts: cloudOpts{caBody: append(pki.EncodeCert(ca.Cert), pki.EncodeCert(other.Cert)...)},
			wantErr: "want exactly one PEM certificate",
		},
		{name: "CA download too large", opts: cloudOpts{caBody: make([]byte, MaxCABytes+1)}, wantErr: "larger than 65536 bytes"},
		{
			// The attacker relays the real CA but cannot present a
			// certificate from it: the token must not reach it.
			name: "server certificate not from the cluster CA", opts: cloudOpts{tlsCA: other},
			wantErr: "not signed by the cluster CA named in the token",
		},
		{
			name: "server certificate for another host", opts: cloudOpts{tlsHosts: []string{"cloud.example"}},
			wantErr: `not valid for "127.0.0.1"`,
		},
		{name: "cloud refuses", opts: cloudOpts{refuse: "token expired at 12:00"}, wantErr: "the cloud refused the join: token expired at 12:00", wantJoins: 1},
		{
			name: "cloud refuses with unprintable reason", opts: cloudOpts{refuse: "no\x1b[2J way"},
			wantErr: "the cloud refused the join: no[2J way", wantJoins: 1,
		},
		{name: "cloud answers garbage", opts: cloudOpts{joinBody: []byte("{")}, wantErr: "decode the response", wantJoins: 1},
		{name: "cloud answers no certificate", opts: cloudOpts{joinBody: []byte("{}")}, wantErr: "holds no certificate", wantJoins: 1},
		{
			name: "response too large", opts: cloudOpts{joinBody: []byte(`{"error":"` + strings.Repeat("a", MaxResponseBytes) + `"}`)},
			wantErr: "larger than 1048576 bytes", wantJoins: 1,
		},
		{
			name: "certificate for another node", opts: cloudOpts{issue: issueClient("edge-2", pki.UsageClient)},
			wantErr: `the certificate is for "edge-2", not for this node "edge-1"`, wantJoins: 1,
		},
		{
			name: "certificate for server use", opts: cloudOpts{issue: issueClient(testNode, pki.UsageServer)},
			wantErr: "not for client authentication", wantJoins: 1,
		},
		{
			name: "certificate for another key",
			opts: cloudOpts{issue: func(t *testing.T, ca *pki.CA, _ *x509.CertificateRequest) []byte {
				return signLeaf(t, ca, testNode, newKey(t).Public(), time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
			}},
			wantErr: "certifies another public key", wantJoins: 1,
		},
		{
			name: "expired certificate",
			opts: cloudOpts{issue: func(t *testing.T, ca *pki.CA, csr *x509.CertificateRequest) []byte {
				return signLeaf(t, ca, testNode, csr.PublicKey, time.Now().Add(-2*time.Hour), time.Now().Add(-time.Hour))
			}},
			wantErr: "the certificate expired at", wantJoins: 1,
		},
		{
			name: "certificate from another CA",
			opts: cloudOpts{issue: func(t *testing.T, _ *pki.CA, csr *x509.CertificateRequest) []byte {
				return issueClient(testNode, pki.UsageClient)(t, other, csr)
			}},
			wantErr: "not signed by the cluster CA", wantJoins: 1,
		},
		{name: "existing key without force", existingKey: true, wantErr: "pass --force", wantIs: ErrAlreadyJoined},
		{name: "existing key with force", existingKey: true, force: true, wantJoins: 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cloud := newFakeCloud(t, ca, tc.opts)
			dir := filepath.Join(t.TempDir(), "edge")
			if tc.existingKey {
				require.NoError(t, os.MkdirAll(dir, 0o700))
				require.NoError(t, os.WriteFile(filepath.Join(dir, IdentityFile), []byte("old identity"), 0o600))
			}
			token := cloud.token.String()
			if tc.token != "" {
				token = tc.token
			}
			var steps []string
			res, err := Join(context.Background(), Config{
				Cloud:    cloud.addr(),
				Token:    token,
				Node:     testNode,
				Dir:      dir,
				Force:    tc.force,
				Timeout:  10 * time.Second,
				Progress: func(s string) { steps = append(steps, s) },
			})
			require.Equal(t, tc.wantJoins, cloud.joinCount(), "join requests received")
			if tc.wantErr != "" {
				require.ErrorContains(t, err, tc.wantErr)
				if tc.wantIs != nil {
					require.ErrorIs(t, err, tc.wantIs)
				}
				if tc.existingKey {
					b, err := os.ReadFile(filepath.Join(dir, IdentityFile))
					require.NoError(t, err)
					require.Equal(t, "old identity", string(b))
					return
				}
				requireNothingStored(t, dir)
				return
			}
			require.NoError(t, err)
			require.Len(t, steps, Steps)
			require.True(t, strings.HasPrefix(steps[0], "[1/6] checking the token"), steps[0])

			info, err := os.Stat(dir)
			require.NoError(t, err)
			require.Equal(t, fs.FileMode(0o700), info.Mode().Perm())
			for _, p := range []string{res.KeyPath, res.CertPath, res.CAPath} {
				info, err := os.Stat(p)
				require.NoError(t, err)
				require.Equal(t, fs.FileMode(0o600), info.Mode().Perm(), p)
			}
			require.Equal(t, filepath.Join(dir, IdentityFile), res.KeyPath)
			require.Equal(t, filepath.Join(dir, IdentityFile), res.CertPath)
			require.Equal(t, filepath.Join(dir, CAFile), res.CAPath)

			pair, pool, leaf, err := Load(dir)
			require.NoError(t, err)
			require.NotNil(t, pair.PrivateKey)
			require.Equal(t, leaf.SerialNumber.Text(16), res.Serial)
			require.True(t, leaf.NotAfter.Equal(res.NotAfter))
			require.Equal(t, testNode, leaf.Subject.CommonName)
			_, err = leaf.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
			require.NoError(t, err)
			require.Equal(t, ca.Cert.Raw, readCert(t, res.CAPath).Raw)

			// The key stayed here: the cloud saw a CSR, never a private key.
			cloud.mu.Lock()
			defer cloud.mu.Unlock()
			require.NotContains(t, cloud.raw[0], "PRIVATE KEY")
			require.Equal(t, testNode, cloud.joins[0].Node)
		})
	}
}

// TestJoinHTTPClient joins through a caller's HTTP client that resolves
// the cloud's name to the loopback server: the name, not the address, is
// what the server's certificate must carry.
func TestJoinHTTPClient(t *testing.T) {
	ca := newCA(t)
	cloud := newFakeCloud(t, ca, cloudOpts{tlsHosts: []string{"cloud.example"}})
	var dialer net.Dialer
	var mu sync.Mutex
	var dialed []string
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			mu.Lock()
			dialed = append(dialed, addr)
			mu.Unlock()
			return dialer.DialContext(ctx, network, cloud.addr())
		},
	}}
	dir := t.TempDir()
	res, err := Join(context.Background(), Config{
		Cloud: "cloud.example:8443", Token: cloud.token.String(), Node: testNode, Dir: dir, HTTPClient: client,
	})
	require.NoError(t, err)
	require.NotEmpty(t, res.Serial)
	require.Equal(t, []string{"cloud.example:8443", "cloud.example:8443"}, dialed,
		"one connection per request: the unverified one is not reused for the join")

	_, err = Join(context.Background(), Config{
		Cloud: "cloud.example:8443", Token: cloud.token.String(), Node: testNode, Dir: t.TempDir(),
		HTTPClient: &http.Client{Transport: roundTripFunc(func(*http.Request) (*http.Response, error) {
			return nil, errors.New("unreachable")
		})},
	})
	require.ErrorContains(t, err, "want *http.Transport")
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

func TestJoinConfig(t *testing.T) {
	good := Config{Cloud: "127.0.0.1:1", Token: "t", Node: "n", Dir: "d"}
	tests := []struct {
		name    string
		edit    func(*Config)
		wantErr string
	}{
		{name: "no cloud", edit: func(c *Config) { c.Cloud = "" }, wantErr: "cloud address is required"},
		{name: "scheme", edit: func(c *Config) { c.Cloud = "https://x:1" }, wantErr: "without a scheme"},
		{name: "no port", edit: func(c *Config) { c.Cloud = "x" }, wantErr: "want host:port"},
		{name: "no token", edit: func(c *Config) { c.Token = "" }, wantErr: "token is required"},
		{name: "no node", edit: func(c *Config) { c.Node = "" }, wantErr: "node name is required"},
		{name: "no dir", edit: func(c *Config) { c.Dir = "" }, wantErr: "directory is required"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := good
			tc.edit(&cfg)
			_, err := Join(context.Background(), cfg)
			require.ErrorContains(t, err, tc.wantErr)
		})
	}
}

// TestJoinUnreachable reports which step failed when nothing listens.
func TestJoinUnreachable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	require.NoError(t, ln.Close())
	ca := newCA(t)
	tok, err := joinapi.NewToken(ca.Cert)
	require.NoError(t, err)
	_, err = Join(context.Background(), Config{Cloud: addr, Token: tok.String(), Node: testNode, Dir: t.TempDir()})
	require.ErrorContains(t, err, "download the cluster CA from "+addr)
}

func readCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	c, err := parseOneCert(b)
	require.NoError(t, err)
	return c
}
