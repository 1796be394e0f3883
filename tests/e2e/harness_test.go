package e2e

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/klog/v2"

	cloudapp "github.com/tetheredge/tether/cloudcore/app"
	"github.com/tetheredge/tether/cloudcore/catalog"
	"github.com/tetheredge/tether/cloudcore/edgenode"
	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/common/pki"
	edgeapp "github.com/tetheredge/tether/edgecore/app"
	"github.com/tetheredge/tether/edgecore/nodestatus"
	"github.com/tetheredge/tether/edgecore/pods"
	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/edgecore/syncer"
	"github.com/tetheredge/tether/tests/containerd"
	"github.com/tetheredge/tether/tests/controlplane"
	"github.com/tetheredge/tether/tests/promtest"
	"github.com/tetheredge/tether/tests/testlog"
	"github.com/tetheredge/tether/tunnel"
)

// The harness runs what ships: CloudCore is cloudcore/app and EdgeCore is
// edgecore/app, in this process, over loopback, against the shared etcd
// and kube-apiserver. Nodes join the whitelist as `cloudcore admin allow`
// and `edgecore join` would leave them (cloud.admit), so the handshake's
// authorisation, the renewer and the whitelist's revocation are those of
// production. The one thing the harness adds is a request counter on the
// API client CloudCore is given.

var cp controlplane.Shared

// TestMain shares one control plane and fails the run if a goroutine is
// left once it has stopped.
func TestMain(m *testing.M) { os.Exit(cp.RunChecked(m)) }

// requestCounter counts the API requests CloudCore makes. A read is what a
// relist would cost: a GET that is not a watch (a GET or a LIST), or a
// watch that starts by sending the current state, which is how client-go's
// informers list (sendInitialEvents=true) and what a watch from no
// resourceVersion or from "0" does. Only a watch resumed from a given
// resourceVersion reads nothing.
type requestCounter struct {
	gets       atomic.Int64 // GETs and LISTs
	watchLists atomic.Int64 // watches that send the current state first
	writes     atomic.Int64

	mu    sync.Mutex
	reads []string // "GET /api/v1/pods?..." of each read, for failure messages
}

// countingTransport is one client's transport, counted into counts.
type countingTransport struct {
	counts *requestCounter
	next   http.RoundTripper
}

func (c countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	c.counts.count(r)
	return c.next.RoundTrip(r)
}

func (c *requestCounter) count(r *http.Request) {
	if r.Method != http.MethodGet {
		c.writes.Add(1)
		return
	}
	q := r.URL.Query()
	watch := q.Get("watch") == "true" || q.Get("watch") == "1" || strings.Contains(r.URL.Path, "/watch/")
	switch rv := q.Get("resourceVersion"); {
	case !watch:
		c.gets.Add(1)
	case q.Get("sendInitialEvents") == "true", rv == "", rv == "0":
		c.watchLists.Add(1)
	default:
		return // a watch resumed from rv
	}
	c.mu.Lock()
	c.reads = append(c.reads, r.Method+" "+r.URL.RequestURI())
	c.mu.Unlock()
}

// total returns the number of reads so far.
func (c *requestCounter) total() int64 { return c.gets.Load() + c.watchLists.Load() }

// since returns the reads after the first n, to say which they were.
func (c *requestCounter) since(n int64) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.reads[min(int(n), len(c.reads)):])
}

// testTimings make dead peers visible in seconds; benchmarks keep the
// production defaults (nil).
func testTimings(o *tunnel.Options) {
	o.KeepAlive, o.DeadPeerTimeout = 200*time.Millisecond, 2*time.Second
}

// timingsOf returns the keepalive and dead-peer timeout timings sets (zero:
// the defaults).
func timingsOf(timings func(*tunnel.Options)) (keepAlive, deadPeer time.Duration) {
	var o tunnel.Options
	if timings != nil {
		timings(&o)
	}
	return o.KeepAlive, o.DeadPeerTimeout
}

// cloudOptions are startCloud's options; the zero value is a QUIC listener
// on a free port with production timings.
type cloudOptions struct {
	// quicAddr is the QUIC address; a restarted cloud is given its
	// predecessor's. Default 127.0.0.1:0.
	quicAddr string
	// webSocket adds a WebSocket listener on a free port.
	webSocket bool
	// timings tune the tunnel (testTimings); nil keeps the defaults.
	timings func(*tunnel.Options)
	// certValidity of node certificates the cloud issues and renews.
	// Default the cloud's.
	certValidity time.Duration
	// offlineAutonomy is the cloud's OfflineAutonomy; zero (off) unless
	// a test is about it.
	offlineAutonomy time.Duration
	// vms runs the VirtualMachine controller (off unless a test is about
	// VMs: its Lease renewals are reads the request counter must not see;
	// cloudcore/vm tests it on its own).
	vms bool
	// rebalance runs the replica balancer (cloudcore/hub) with a 1 s
	// period, as the shipped command does with its default.
	rebalance bool
	// kubernetes is the config CloudCore runs with (the RBAC test's
	// ServiceAccount); nil: the cfg given to startCloud. The harness's own
	// EdgeNode client always uses cfg.
	kubernetes *rest.Config
	// logger is CloudCore's logger; nil: testlog.New().
	logger *slog.Logger
}

// cloud is an in-process CloudCore with its API requests counted.
type cloud struct {
	app      *cloudapp.App
	cat      *catalog.Catalog
	reg      *promtest.Registry
	requests *requestCounter
	nodes    *edgenode.Client // the admin's, not counted
	addr     string           // the bound QUIC address
	stop     func()
}

// startCloud runs CloudCore (cloudcore/app) until tb ends or stop is
// called, and returns once its catalog holds the cluster's state. Every
// cloud start is the positive control of the request counter: building
// the caches reads.
func startCloud(tb testing.TB, cfg *rest.Config, o cloudOptions) *cloud {
	tb.Helper()
	if o.quicAddr == "" {
		o.quicAddr = "127.0.0.1:0"
	}
	rc := &requestCounter{}
	run, logger := cfg, o.logger
	if o.kubernetes != nil {
		run = o.kubernetes
	}
	if logger == nil {
		logger = testlog.New()
	}
	counted := rest.CopyConfig(run)
	counted.QPS, counted.Burst = 1000, 1000
	counted.Wrap(func(rt http.RoundTripper) http.RoundTripper { return countingTransport{counts: rc, next: rt} })
	admin := rest.CopyConfig(cfg)
	admin.QPS, admin.Burst = 1000, 1000
	dyn, err := dynamic.NewForConfig(admin)
	require.NoError(tb, err)
	keepAlive, deadPeer := timingsOf(o.timings)
	wsAddr := ""
	if o.webSocket {
		wsAddr = "127.0.0.1:0"
	}
	reg := promtest.NewRegistry()
	ctx, cancel := context.WithCancel(context.Background())
	a, err := cloudapp.New(ctx, cloudapp.Config{
		Kubernetes: counted, QUICAddr: o.quicAddr, WebSocketAddr: wsAddr, JoinAddr: "127.0.0.1:0",
		ServerSANs: []string{"127.0.0.1"}, CertValidity: o.certValidity,
		KeepAlive: keepAlive, DeadPeerTimeout: deadPeer, OfflineAutonomy: o.offlineAutonomy, Logger: logger, Registerer: reg,
		VMs:       cloudapp.VMConfig{Disabled: !o.vms},
		Rebalance: cloudapp.RebalanceConfig{Enabled: o.rebalance, Period: time.Second},
	})
	if err != nil {
		cancel()
		require.NoError(tb, err)
	}
	if err := a.Listen(); err != nil {
		cancel()
		require.NoError(tb, err)
	}
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	c := &cloud{
		app: a, cat: a.Catalog(), reg: reg, requests: rc, nodes: edgenode.NewClient(dyn),
		addr: a.QUICAddr().String(),
	}
	c.stop = sync.OnceFunc(func() {
		cancel()
		require.NoError(tb, <-done)
	})
	tb.Cleanup(c.stop)
	require.NoError(tb, c.cat.WaitForSync(ctx))
	// The positive control: building the caches lists every resource the
	// cloud syncs or authorises from (today through watches with
	// sendInitialEvents=true), and the counter sees each list.
	listed := func() bool {
		reads := rc.since(0)
		for _, path := range []string{"/api/v1/pods", "/api/v1/nodes", "/api/v1/configmaps", "/api/v1/secrets", "/apis/edge.tether.dev/v1alpha1/edgenodes"} {
			if !slices.ContainsFunc(reads, func(r string) bool { return strings.HasPrefix(r, "GET "+path+"?") || r == "GET "+path }) {
				return false
			}
		}
		return true
	}
	if !assert.Eventually(tb, listed, 30*time.Second, 5*time.Millisecond) {
		tb.Fatalf("the request counter did not see the cloud's initial lists of pods, Nodes, ConfigMaps, Secrets and EdgeNodes; it saw %s",
			describe(rc.since(0)))
	}
	return c
}

// counter reads a counter from the cloud's registry, summed over labels
// matching want. An unknown name or label fails tb.
func (c *cloud) counter(tb testing.TB, name string, want map[string]string) float64 {
	tb.Helper()
	return promtest.Sum(tb, c.reg, name, want)
}

// poll is counter for conditions polled off the test's goroutine
// (require.Eventually), where failing the test is not allowed: it returns
// NaN, which no comparison accepts, for an unknown name or label. Read the
// counter with counter once on the test's goroutine first, so that such a
// mistake fails at once rather than as a timeout.
func (c *cloud) poll(name string, want map[string]string) float64 {
	v, err := promtest.Value(c.reg, name, want)
	if err != nil {
		return math.NaN()
	}
	return v
}

// dones returns how many reconciles the cloud has finished (sent Done for).
func (c *cloud) dones(tb testing.TB) float64 {
	tb.Helper()
	return c.counter(tb, "tether_sync_messages_sent_total", map[string]string{"kind": "done"})
}

// waitDones waits until the cloud has finished n reconciles in all.
func (c *cloud) waitDones(tb testing.TB, n float64) {
	tb.Helper()
	c.dones(tb) // fails at once if the metric is gone
	require.Eventually(tb, func() bool {
		return c.poll("tether_sync_messages_sent_total", map[string]string{"kind": "done"}) >= n
	}, 60*time.Second, 10*time.Millisecond, "the cloud did not finish %v reconciles", n)
}

// identity is a node's certificate, current on the whitelist.
type identity struct {
	node string
	cert tls.Certificate // Leaf set
	key  crypto.Signer   // cert's key
	ca   *x509.Certificate
}

// tlsConfig is the client TLS configuration of a raw tunnel client with
// this identity.
func (id identity) tlsConfig() *tls.Config {
	pool := x509.NewCertPool()
	pool.AddCert(id.ca)
	return &tls.Config{Certificates: []tls.Certificate{id.cert}, RootCAs: pool, MinVersion: tls.VersionTLS13}
}

// admit puts node on the whitelist as `cloudcore admin allow` and
// `edgecore join` leave it: an allowed EdgeNode whose current certificate
// is a fresh one from the cluster CA, which it returns. The EdgeNode is
// removed when tb ends. admit returns once the cloud's whitelist admits
// the certificate.
func (c *cloud) admit(tb testing.TB, node string) identity {
	tb.Helper()
	id := admitNode(tb, c.nodes, c.app.CA(), node)
	tid := tunnel.Identity{Node: node, Serial: id.cert.Leaf.SerialNumber.Text(16), NotAfter: id.cert.Leaf.NotAfter, Certificate: id.cert.Leaf}
	require.Eventually(tb, func() bool { return c.app.Authorize(tid) == nil }, 30*time.Second, 5*time.Millisecond,
		"the whitelist did not admit %s", node)
	return id
}

// admitNode is admit without waiting for a cloud's whitelist: for clouds
// in other processes, which edges simply retry until they admit it.
func admitNode(tb testing.TB, nodes *edgenode.Client, ca *pki.CA, node string) identity {
	tb.Helper()
	ctx := context.Background()
	cert, key, err := ca.Issue(pki.LeafRequest{CommonName: node, Usage: pki.UsageClient, Validity: time.Hour})
	require.NoError(tb, err)
	en, err := nodes.Create(ctx, &edgenode.EdgeNode{ObjectMeta: metav1.ObjectMeta{Name: node}, Spec: edgenode.Spec{Allowed: true}})
	if apierrors.IsAlreadyExists(err) { // left by an earlier run on a reused name
		en, err = nodes.Get(ctx, node)
		require.NoError(tb, err)
		en.Spec = edgenode.Spec{Allowed: true}
		en, err = nodes.Update(ctx, en)
	}
	require.NoError(tb, err)
	tb.Cleanup(func() {
		if err := nodes.Delete(context.Background(), node); err != nil && !apierrors.IsNotFound(err) {
			tb.Errorf("delete EdgeNode %s: %v", node, err)
		}
	})
	en.Status.Certificate = &edgenode.Certificate{Serial: cert.SerialNumber.Text(16), NotAfter: metav1.NewTime(cert.NotAfter)}
	_, err = nodes.UpdateStatus(ctx, en)
	require.NoError(tb, err)
	return identity{node: node, cert: tls.Certificate{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert}, key: key, ca: ca.Cert}
}

// edgeOptions are startEdge's options; the zero value has production
// tunnel timings and a Node that is the same on every start.
type edgeOptions struct {
	// timings tune the tunnel (testTimings); nil keeps the defaults.
	timings func(*tunnel.Options)
	// wrap, when set, wraps the store the syncer writes through
	// (benchmarks observe commits that way).
	wrap func(*store.Store) syncer.Store
	// nodeStatus configures the node's registration and heartbeat. Its
	// zero Now is a fixed instant and its zero MemoryBytes 4 GiB, so that
	// every start of the edge registers the same Node: re-registering
	// changes nothing, and a test can count exactly what a reconnect
	// sends.
	nodeStatus nodestatus.Config
	// runtime, when set, runs EdgeCore's CRI shim in-process in front of
	// this containerd, and the pod manager drives the shim (what
	// `edgecore --cri-listen --containerd` runs); the Node then requires
	// the runtime to be Ready. Nil: no shim and no pods, as the sync
	// tests need.
	runtime *containerd.Host
	// pods tunes the pod manager when runtime is set; its zero HostIPs
	// are 127.0.0.1 and its zero LogDir a directory of the test's.
	pods pods.Config
	// configure, when set, edits EdgeCore's configuration last (the CRI
	// shim, the VM runtime, the resource pool).
	configure func(*edgeapp.Config)
}

// stableEpoch is the edges' clock unless a test gives one.
var stableEpoch = time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)

// edge is an in-process EdgeCore (edgecore/app).
type edge struct {
	node string
	app  *edgeapp.App
	st   *store.Store
	reg  *promtest.Registry
	// criSocket is the in-process CRI shim's socket (edgeOptions.runtime),
	// empty without.
	criSocket string
	stop      func()
}

// startEdge runs EdgeCore with identity id and its data in dataDir,
// connecting over QUIC to cloudAddr, until tb ends or stop is called.
func startEdge(tb testing.TB, id identity, dataDir, cloudAddr string, o edgeOptions) *edge {
	tb.Helper()
	ns := o.nodeStatus
	if ns.Now == nil {
		ns.Now = func() time.Time { return stableEpoch }
	}
	if ns.MemoryBytes == 0 {
		ns.MemoryBytes = 4 << 30
	}
	keepAlive, deadPeer := timingsOf(o.timings)
	reg := promtest.NewRegistry()
	// cri-client logs through klog: its logger is the context's.
	ctx, cancel := context.WithCancel(klog.NewContext(context.Background(), logr.Discard()))
	cfg := edgeapp.Config{
		Cloud: []string{"quic://" + cloudAddr}, Node: id.node, Certificate: id.cert, CA: id.ca,
		IdentityDir: dataDir, DataDir: dataDir,
		KeepAlive: keepAlive, DeadPeerTimeout: deadPeer,
		Backoff:    tunnel.Backoff{Min: 50 * time.Millisecond, Max: 500 * time.Millisecond},
		NodeStatus: ns, WrapStore: o.wrap, Logger: testlog.New().With("edge", id.node), Registerer: reg,
	}
	if o.runtime != nil {
		cfg.CRI, cfg.Pods = runtimeConfig(tb, o.runtime, o.pods)
		cfg.NodeStatus.RequireRuntime = true
	}
	if o.configure != nil {
		o.configure(&cfg)
	}
	a, err := edgeapp.New(ctx, cfg)
	if err != nil {
		cancel()
		require.NoError(tb, err)
	}
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	e := &edge{node: id.node, app: a, st: a.Store(), reg: reg, criSocket: cfg.CRI.Listen}
	e.stop = sync.OnceFunc(func() {
		cancel()
		require.NoError(tb, <-done)
		require.NoError(tb, a.Close())
	})
	tb.Cleanup(e.stop)
	return e
}

// runtimeConfig is the CRI shim and pod manager configuration of an edge
// that runs pods on h: the shim's socket in a short directory of its own
// (a unix address has 108 bytes, the test's temporary directory may be
// longer), the pods' logs in the test's.
func runtimeConfig(tb testing.TB, h *containerd.Host, p pods.Config) (edgeapp.CRIConfig, pods.Config) {
	tb.Helper()
	sock, err := os.MkdirTemp("", "tether-cri-")
	require.NoError(tb, err)
	tb.Cleanup(func() { _ = os.RemoveAll(sock) })
	if len(p.HostIPs) == 0 {
		p.HostIPs = []string{"127.0.0.1"}
	}
	if p.LogDir == "" {
		p.LogDir = filepath.Join(tb.TempDir(), "logs")
	}
	return edgeapp.CRIConfig{Listen: filepath.Join(sock, "cri.sock"), Containerd: h.Endpoint()}, p
}

// waitRegistered waits until node's EdgeCore has registered its Node and
// the cloud's catalog holds the registered version.
func waitRegistered(tb testing.TB, cs kubernetes.Interface, c *cloud, node string) {
	tb.Helper()
	require.Eventually(tb, func() bool {
		n, err := cs.CoreV1().Nodes().Get(context.Background(), node, metav1.GetOptions{})
		if err != nil || !slices.ContainsFunc(n.Status.Conditions, func(c corev1.NodeCondition) bool { return c.Reason == "EdgeCoreReady" }) {
			return false
		}
		o, ok := c.cat.Get(node, objsync.Key{Kind: "Node", Name: node})
		return ok && o.Version == n.ResourceVersion
	}, 30*time.Second, 10*time.Millisecond, "node %s did not register", node)
}

// counter reads a counter from the edge's registry, as cloud.counter.
func (e *edge) counter(tb testing.TB, name string, want map[string]string) float64 {
	tb.Helper()
	return promtest.Sum(tb, e.reg, name, want)
}

// applied returns how many cloud events this run of the edge committed.
func (e *edge) applied(tb testing.TB) float64 {
	tb.Helper()
	return e.counter(tb, "tether_edge_events_applied_total", nil)
}

// storePath is the edge store's file in dataDir.
func storePath(dataDir string) string { return filepath.Join(dataDir, edgeapp.DBFile) }

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

// held returns what st holds: key hash -> version hash.
func held(tb testing.TB, st *store.Store) map[uint64]uint64 {
	tb.Helper()
	inv, err := st.Inventory(context.Background())
	require.NoError(tb, err)
	out := make(map[uint64]uint64, len(inv))
	for _, e := range inv {
		out[e.Key] = e.Version
	}
	return out
}

// waitConverged waits until the edge store holds exactly what the catalog
// says the node should hold, and that is at least minObjects objects.
func waitConverged(tb testing.TB, c *catalog.Catalog, st *store.Store, node string, minObjects int) {
	tb.Helper()
	require.Eventually(tb, func() bool {
		want := desired(c, node)
		if len(want) < minObjects {
			return false
		}
		inv, err := st.Inventory(context.Background())
		if err != nil {
			return false // Eventually's condition runs off the test goroutine: no require here
		}
		if len(inv) != len(want) {
			return false
		}
		for _, e := range inv {
			if want[e.Key] != e.Version {
				return false
			}
		}
		return true
	}, 60*time.Second, 50*time.Millisecond, "edge %s did not converge", node)
}

// requireKeys fails tb unless st holds exactly the objects want names,
// naming the missing ones and counting the others.
func requireKeys(tb testing.TB, st *store.Store, want []objsync.Key) {
	tb.Helper()
	got := held(tb, st)
	var missing []string
	for _, k := range want {
		if _, ok := got[k.Hash()]; !ok {
			missing = append(missing, k.String())
		}
		delete(got, k.Hash())
	}
	if len(missing) > 0 || len(got) > 0 {
		tb.Fatalf("edge store: %d of %d wanted objects missing %v; %d objects it must not hold", len(missing), len(want), missing, len(got))
	}
}

// dataDir returns a fresh data directory for an edge.
func dataDir(tb testing.TB, node string) string {
	tb.Helper()
	dir := filepath.Join(tb.TempDir(), node)
	require.NoError(tb, os.Mkdir(dir, 0o700))
	return dir
}

// describe formats reads for a failure message.
func describe(reads []string) string {
	if len(reads) > 20 {
		return fmt.Sprintf("%v ... (%d in all)", reads[:20], len(reads))
	}
	return fmt.Sprint(reads)
}
