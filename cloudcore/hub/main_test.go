package hub_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"

	"github.com/tetheredge/tether/cloudcore/edgenode"
	"github.com/tetheredge/tether/cloudcore/hub"
	"github.com/tetheredge/tether/cloudcore/onboard"
	"github.com/tetheredge/tether/cloudcore/whitelist"
	"github.com/tetheredge/tether/common/join"
	"github.com/tetheredge/tether/common/pki"
	"github.com/tetheredge/tether/tests/controlplane"
	"github.com/tetheredge/tether/tests/testlog"
	"github.com/tetheredge/tether/tunnel"
)

// cp is the real etcd and kube-apiserver the tests of this package share.
var cp controlplane.Shared

func TestMain(m *testing.M) { os.Exit(cp.RunChecked(m)) }

// waitFor bounds every wait of these tests: the informer sees a change
// within about a second, so this is ample and a hang fails, never passes.
const waitFor = 15 * time.Second

// cluster is a control plane client and a cluster CA.
type cluster struct {
	cfg   *rest.Config
	dyn   dynamic.Interface
	nodes *edgenode.Client
	ca    *pki.CA
}

func newCluster(t *testing.T) *cluster {
	t.Helper()
	cfg := rest.CopyConfig(cp.Env(t).Config)
	cfg.QPS, cfg.Burst = 1000, 1000
	dyn, err := dynamic.NewForConfig(cfg)
	require.NoError(t, err)
	ca, err := pki.NewCA("test-ca", 24*time.Hour)
	require.NoError(t, err)
	return &cluster{cfg: cfg, dyn: dyn, nodes: edgenode.NewClient(dyn), ca: ca}
}

// name returns a fresh EdgeNode name, removed when the test ends.
func (c *cluster) name(t *testing.T, prefix string) string {
	t.Helper()
	n := prefix + "-" + strings.ToLower(rand.Text()[:8])
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := c.nodes.Delete(ctx, n); err != nil && !apierrors.IsNotFound(err) {
			t.Errorf("delete EdgeNode %s: %v", n, err)
		}
	})
	return n
}

// allow whitelists a fresh node and returns its name and join token.
func (c *cluster) allow(t *testing.T, prefix string) (string, join.Token) {
	t.Helper()
	node := c.name(t, prefix)
	tok, _, err := onboard.Allow(t.Context(), c.nodes, c.ca.Cert, node, onboard.AllowOptions{})
	require.NoError(t, err)
	return node, tok
}

// identity is a node key and the certificate the cloud issued for it.
type identity struct {
	key  *ecdsa.PrivateKey
	cert *x509.Certificate
}

func (id identity) serial() string { return id.cert.SerialNumber.Text(16) }

func (id identity) tls() tls.Certificate {
	return tls.Certificate{Certificate: [][]byte{id.cert.Raw}, PrivateKey: id.key, Leaf: id.cert}
}

func (id identity) peer() tunnel.Identity {
	return tunnel.Identity{Node: id.cert.Subject.CommonName, Serial: id.serial(), NotAfter: id.cert.NotAfter, Certificate: id.cert}
}

// newKey returns a key and a certificate request for it, PEM.
func newKey(t *testing.T) (*ecdsa.PrivateKey, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "x"}}, key)
	require.NoError(t, err)
	return key, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

// joinService is a real join endpoint on loopback, as one replica runs it.
type joinService struct {
	base   string
	client *http.Client
}

func (c *cluster) startJoin(t *testing.T, validity time.Duration) *joinService {
	t.Helper()
	serverCert, err := onboard.ServerCertificate(c.ca, []string{"127.0.0.1"}, time.Hour)
	require.NoError(t, err)
	svc, err := onboard.New(onboard.Config{
		Addr: "127.0.0.1:0", TLS: &tls.Config{Certificates: []tls.Certificate{serverCert}},
		EdgeNodes: c.nodes, Issuer: &onboard.Issuer{CA: c.ca, Validity: validity}, Logger: testlog.New(),
	})
	require.NoError(t, err)
	require.NoError(t, svc.Listen())
	run(t, svc.Run)
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: c.ca.Pool(), MinVersion: tls.VersionTLS13}}
	t.Cleanup(tr.CloseIdleConnections)
	return &joinService{base: "https://" + svc.Addr().String(), client: &http.Client{Transport: tr, Timeout: 30 * time.Second}}
}

// join trades tok for a certificate, as edgecore join does.
func (j *joinService) join(t *testing.T, node string, tok join.Token) identity {
	t.Helper()
	key, csr := newKey(t)
	body, err := json.Marshal(join.Request{Node: node, Token: tok.String(), CSR: string(csr)})
	require.NoError(t, err)
	resp, err := j.client.Post(j.base+join.PathJoin, "application/json", bytes.NewReader(body))
	require.NoError(t, err)
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode, "join: %s", raw)
	var out join.Response
	require.NoError(t, json.Unmarshal(raw, &out))
	block, _ := pem.Decode([]byte(out.Certificate))
	require.NotNil(t, block)
	cert, err := x509.ParseCertificate(block.Bytes)
	require.NoError(t, err)
	return identity{key: key, cert: cert}
}

// run runs fn until the test ends, and fails the test if it returns an
// error or does not return.
func run(t *testing.T, fn func(context.Context) error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- fn(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-time.After(30 * time.Second):
			t.Errorf("Run did not return after its context ended")
		}
	})
}

// replica is one CloudCore's whitelist, hub and tunnel server on
// loopback, wired as cloudcore/app wires them; the protocol only holds the
// session open.
type replica struct {
	wl   *whitelist.Whitelist
	hub  *hub.Hub
	addr string

	mu       sync.Mutex
	sessions map[string]*tunnel.Session // served, by node
}

// replicaHooks let a test act at exact moments.
type replicaHooks struct {
	// authorize, when not nil, wraps the whitelist's handshake check.
	authorize func(tunnel.Identity, func(tunnel.Identity) error) error
	// changed, when not nil, is told of each whitelist change after the
	// hub has re-checked its sessions.
	changed func(node string)
}

// startReplica starts a replica.
func (c *cluster) startReplica(t *testing.T, hooks replicaHooks) *replica {
	t.Helper()
	r := &replica{wl: whitelist.New(c.dyn, testlog.New(), nil), sessions: map[string]*tunnel.Session{}}
	r.hub = hub.New(protocolFunc(func(ctx context.Context, s *tunnel.Session) error {
		r.mu.Lock()
		r.sessions[s.Peer().Node] = s
		r.mu.Unlock()
		select {
		case <-ctx.Done():
		case <-s.Done():
		}
		return nil
	}), r.wl, testlog.New())
	r.wl.OnChange(r.hub.Recheck)
	if hooks.changed != nil {
		r.wl.OnChange(hooks.changed)
	}
	run(t, r.wl.Run)
	require.NoError(t, r.wl.WaitForSync(t.Context()))
	serverCert, err := onboard.ServerCertificate(c.ca, []string{"127.0.0.1"}, time.Hour)
	require.NoError(t, err)
	auth := r.wl.Authorize
	if hooks.authorize != nil {
		auth = func(id tunnel.Identity) error { return hooks.authorize(id, r.wl.Authorize) }
	}
	srv, err := tunnel.NewServer(tunnel.ServerConfig{
		Options:   tunnel.Options{Logger: testlog.New()},
		QUICAddr:  "127.0.0.1:0",
		TLS:       &tls.Config{Certificates: []tls.Certificate{serverCert}, ClientCAs: c.ca.Pool()},
		Authorize: auth,
		Handler:   r.hub,
	})
	require.NoError(t, err)
	require.NoError(t, srv.Listen())
	r.addr = srv.QUICAddr().String()
	run(t, srv.Run)
	return r
}

type protocolFunc func(ctx context.Context, s *tunnel.Session) error

func (f protocolFunc) Serve(ctx context.Context, s *tunnel.Session) error { return f(ctx, s) }

// dial opens a session to r as the node of id, once.
func (c *cluster) dial(t *testing.T, r *replica, id identity) (*tunnel.Session, error) {
	t.Helper()
	client, err := tunnel.NewClient(tunnel.ClientConfig{
		Options: tunnel.Options{Logger: testlog.New()},
		Servers: []string{"quic://" + r.addr},
		Node:    id.cert.Subject.CommonName,
		TLS:     &tls.Config{Certificates: []tls.Certificate{id.tls()}, RootCAs: c.ca.Pool()},
	})
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(t.Context(), waitFor)
	defer cancel()
	s, err := client.Dial(ctx)
	if err == nil {
		t.Cleanup(func() { _ = s.Close("test over") })
	}
	return s, err
}

// requireClosed waits for s to end, and checks the reason the cloud gave.
func requireClosed(t *testing.T, s *tunnel.Session, reason string) {
	t.Helper()
	select {
	case <-s.Done():
	case <-time.After(waitFor):
		t.Fatalf("session still open after %s; it should have been closed (%s)", waitFor, reason)
	}
	require.ErrorContains(t, s.Err(), reason)
}

// waitRefused waits until r's whitelist refuses id (its cache saw the
// change that refuses it).
func waitRefused(t *testing.T, r *replica, id identity) {
	t.Helper()
	require.Eventually(t, func() bool { return r.wl.Authorize(id.peer()) != nil }, waitFor, 10*time.Millisecond)
}

// record makes id's certificate the node's current one, as a join does.
func (c *cluster) record(t *testing.T, node string, validity time.Duration) identity {
	t.Helper()
	key, csr := newKey(t)
	cert, err := (&onboard.Issuer{CA: c.ca, Validity: validity}).Sign(csr, node)
	require.NoError(t, err)
	e, err := c.nodes.Get(t.Context(), node)
	require.NoError(t, err)
	e.Status.Certificate = &edgenode.Certificate{Serial: cert.SerialNumber.Text(16), NotAfter: metav1.NewTime(cert.NotAfter)}
	_, err = c.nodes.UpdateStatus(t.Context(), e)
	require.NoError(t, err)
	return identity{key: key, cert: cert}
}

func (c *cluster) get(t *testing.T, node string) *edgenode.EdgeNode {
	t.Helper()
	e, err := c.nodes.Get(t.Context(), node)
	require.NoError(t, err)
	return e
}
