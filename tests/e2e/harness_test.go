package e2e

import (
	"context"
	"crypto/tls"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/tetheredge/tether/cloudcore/catalog"
	"github.com/tetheredge/tether/cloudcore/dispatch"
	"github.com/tetheredge/tether/cloudcore/hub"
	"github.com/tetheredge/tether/cloudcore/upstream"
	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/common/pki"
	"github.com/tetheredge/tether/edgecore/edgehub"
	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/edgecore/syncer"
	"github.com/tetheredge/tether/tests/controlplane"
	"github.com/tetheredge/tether/tests/promtest"
	"github.com/tetheredge/tether/tunnel"
)

var cp controlplane.Shared

func TestMain(m *testing.M) { os.Exit(cp.Run(m)) }

func logger() *slog.Logger {
	if os.Getenv("TETHER_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// requestCounter counts API requests that are not watches: the LISTs and
// GETs a reconnect must never cause.
type requestCounter struct {
	reads  atomic.Int64
	writes atomic.Int64
	next   http.RoundTripper
}

func (c *requestCounter) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Method == http.MethodGet {
		if r.URL.Query().Get("watch") != "true" && !strings.Contains(r.URL.Path, "/watch/") {
			c.reads.Add(1)
		}
	} else {
		c.writes.Add(1)
	}
	return c.next.RoundTrip(r)
}

// pkiSet is a cluster CA with the server's certificate.
type pkiSet struct {
	ca     *pki.CA
	server tls.Certificate
}

func newPKI(t testing.TB) *pkiSet {
	ca, err := pki.NewCA("e2e", time.Hour)
	require.NoError(t, err)
	cert, key, err := ca.Issue(pki.LeafRequest{CommonName: "cloudcore", Usage: pki.UsageServer, Hosts: []string{"127.0.0.1"}, Validity: time.Hour})
	require.NoError(t, err)
	return &pkiSet{ca: ca, server: tls.Certificate{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert}}
}

func (p *pkiSet) client(t testing.TB, node string) *tls.Config {
	cert, key, err := p.ca.Issue(pki.LeafRequest{CommonName: node, Usage: pki.UsageClient, Validity: time.Hour})
	require.NoError(t, err)
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{cert.Raw}, PrivateKey: key}}, RootCAs: p.ca.Pool(), MinVersion: tls.VersionTLS13}
}

// cloud is an in-process CloudCore: catalog, dispatcher, upstream writer
// and tunnel server, with its API requests counted.
type cloud struct {
	cat      *catalog.Catalog
	srv      *tunnel.Server
	reg      *prometheus.Registry
	requests *requestCounter
	stop     func()
}

// testTimings make dead peers visible in seconds; benchmarks keep the
// production defaults (nil).
func testTimings(o *tunnel.Options) {
	o.KeepAlive, o.DeadPeerTimeout = 200*time.Millisecond, 2*time.Second
}

func startCloud(t testing.TB, cfg *rest.Config, p *pkiSet, addr string, timings func(*tunnel.Options)) *cloud {
	t.Helper()
	counted := rest.CopyConfig(cfg)
	rc := &requestCounter{}
	counted.Wrap(func(rt http.RoundTripper) http.RoundTripper { rc.next = rt; return rc })
	counted.QPS, counted.Burst = 1000, 1000
	client, err := kubernetes.NewForConfig(counted)
	require.NoError(t, err)
	log := logger()
	reg := prometheus.NewRegistry()
	cat, err := catalog.New(client, catalog.Config{Logger: log})
	require.NoError(t, err)
	up, err := upstream.New(client, cat, upstream.Config{EdgeLabel: catalog.DefaultEdgeLabel, Logger: log})
	require.NoError(t, err)
	disp := dispatch.New(dispatch.Deps{Catalog: cat, Upstream: up}, dispatch.Config{}, log, reg)
	cat.Subscribe(disp.Notify)
	opts := tunnel.Options{Logger: log, Registerer: reg}
	if timings != nil {
		timings(&opts)
	}
	srv, err := tunnel.NewServer(tunnel.ServerConfig{
		Options:  opts,
		QUICAddr: addr,
		TLS:      &tls.Config{Certificates: []tls.Certificate{p.server}, ClientCAs: p.ca.Pool(), MinVersion: tls.VersionTLS13},
		Handler:  hub.New(disp, nil, log),
	})
	require.NoError(t, err)
	require.NoError(t, srv.Listen())
	ctx, cancel := context.WithCancel(context.Background())
	catDone := make(chan error, 1)
	go func() { catDone <- cat.Run(ctx) }()
	require.NoError(t, cat.WaitForSync(ctx))
	srvDone := make(chan error, 1)
	go func() { srvDone <- srv.Run(ctx) }()
	c := &cloud{cat: cat, srv: srv, reg: reg, requests: rc}
	c.stop = sync.OnceFunc(func() {
		cancel()
		require.NoError(t, <-srvDone)
		require.NoError(t, <-catDone)
	})
	t.Cleanup(c.stop)
	return c
}

// counter reads a counter from the cloud's registry, summed over labels
// matching want.
func (c *cloud) counter(t testing.TB, name string, want map[string]string) float64 {
	t.Helper()
	return promtest.Sum(t, c.reg, name, want)
}

// edge is an in-process EdgeCore: store, syncer and tunnel client.
type edge struct {
	node string
	st   *store.Store
	sy   *syncer.Syncer
	stop func()
}

// startEdge runs an edge on dbPath. wrap, when set, wraps the store the
// syncer writes through (benchmarks observe commits that way).
func startEdge(t testing.TB, node, dbPath, cloudAddr string, p *pkiSet, timings func(*tunnel.Options), wrap func(*store.Store) syncer.Store) *edge {
	t.Helper()
	log := logger().With("edge", node)
	ctx, cancel := context.WithCancel(context.Background())
	st, err := store.Open(ctx, dbPath, log)
	require.NoError(t, err)
	var sst syncer.Store = st
	if wrap != nil {
		sst = wrap(st)
	}
	sy, err := syncer.New(sst, syncer.Config{}, log, nil)
	require.NoError(t, err)
	opts := tunnel.Options{Logger: log}
	if timings != nil {
		timings(&opts)
	}
	client, err := tunnel.NewClient(tunnel.ClientConfig{
		Options: opts,
		Servers: []string{"quic://" + cloudAddr},
		Node:    node,
		TLS:     p.client(t, node),
		Backoff: tunnel.Backoff{Min: 50 * time.Millisecond, Max: 500 * time.Millisecond},
	})
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { done <- edgehub.New(client, sy, log).Run(ctx) }()
	e := &edge{node: node, st: st, sy: sy}
	e.stop = sync.OnceFunc(func() {
		cancel()
		require.NoError(t, <-done)
		require.NoError(t, st.Close())
	})
	t.Cleanup(e.stop)
	return e
}

// desired returns what the catalog says node should hold: key -> version hash.
func desired(c *catalog.Catalog, node string) map[uint64]uint64 {
	out := map[uint64]uint64{}
	for _, k := range c.Keys(node) {
		if o, ok := c.Get(node, k); ok {
			out[k.Hash()] = objsync.VersionHash(o.Resource.UID, o.Version)
		}
	}
	return out
}

func held(t *testing.T, st *store.Store) map[uint64]uint64 {
	inv, err := st.Inventory(context.Background())
	require.NoError(t, err)
	out := make(map[uint64]uint64, len(inv))
	for _, e := range inv {
		out[e.Key] = e.Version
	}
	return out
}

// waitConverged waits until the edge store holds exactly what the catalog
// says the node should hold.
func waitConverged(t *testing.T, c *catalog.Catalog, st *store.Store, node string, minObjects int) {
	t.Helper()
	require.Eventually(t, func() bool {
		want := desired(c, node)
		if len(want) < minObjects {
			return false
		}
		inv, err := st.Inventory(context.Background())
		if err != nil {
			return false // Eventually's condition runs off the test goroutine: no require here
		}
		got := make(map[uint64]uint64, len(inv))
		for _, e := range inv {
			got[e.Key] = e.Version
		}
		if len(got) != len(want) {
			return false
		}
		for k, v := range want {
			if got[k] != v {
				return false
			}
		}
		return true
	}, 60*time.Second, 50*time.Millisecond, "edge %s did not converge", node)
}

func dbPath(t *testing.T, node string) string {
	return filepath.Join(t.TempDir(), node+".db")
}
