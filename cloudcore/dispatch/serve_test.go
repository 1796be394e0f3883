package dispatch

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"runtime/pprof"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/tetheredge/tether/cloudcore/catalog"
	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/common/pki"
	"github.com/tetheredge/tether/tunnel"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeCatalog is a node's desired state held in memory: the informer
// cache is the catalog package's, tested there against a real API server.
type fakeCatalog struct {
	mu   sync.Mutex
	objs map[objsync.Key]catalog.Object
}

func (c *fakeCatalog) put(key objsync.Key, version string, data []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.objs == nil {
		c.objs = map[objsync.Key]catalog.Object{}
	}
	c.objs[key] = catalog.Object{
		Resource: message.Resource{Group: key.Group, Version: "v1", Kind: key.Kind, Namespace: key.Namespace, Name: key.Name, UID: "uid-" + key.Name},
		Version:  version, Data: data,
	}
}

func (c *fakeCatalog) Keys(string) []objsync.Key {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]objsync.Key, 0, len(c.objs))
	for k := range c.objs {
		out = append(out, k)
	}
	return out
}

func (c *fakeCatalog) Version(_ string, key objsync.Key) (string, string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	o, ok := c.objs[key]
	return o.Resource.UID, o.Version, ok
}

func (c *fakeCatalog) Get(_ string, key objsync.Key) (catalog.Object, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	o, ok := c.objs[key]
	return o, ok
}

// fakeUpstream answers a write with the error named by its resource name;
// the real writer (cloudcore/upstream) is tested against a real API
// server. Apply blocks while gate is set and not closed.
type fakeUpstream struct {
	errs    map[string]error
	calls   atomic.Int64
	started chan string
	gate    chan struct{}
}

func (u *fakeUpstream) Apply(ctx context.Context, _ string, m *message.Message) error {
	u.calls.Add(1)
	if u.started != nil {
		u.started <- m.Resource.Name
	}
	if u.gate != nil {
		select {
		case <-u.gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return u.errs[m.Resource.Name]
}

// countingHandler counts the log records at Warn and above.
type countingHandler struct{ warns atomic.Int64 }

func (h *countingHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *countingHandler) Handle(_ context.Context, r slog.Record) error {
	if r.Level >= slog.LevelWarn {
		h.warns.Add(1)
	}
	return nil
}
func (h *countingHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *countingHandler) WithGroup(string) slog.Handler      { return h }

// rig is a dispatcher behind a real tunnel server on loopback, and a
// session to it that plays the edge.
type rig struct {
	d    *Dispatcher
	cat  *fakeCatalog
	up   *fakeUpstream
	log  *countingHandler
	edge *tunnel.Session
	ids  uint64

	edgeSerial string // of the edge's certificate
}

// newRig starts the dispatcher (ren may be nil) and connects the edge.
func newRig(t *testing.T, cfg Config, up *fakeUpstream, ren Renewer, opts tunnel.Options) *rig {
	t.Helper()
	ca, err := pki.NewCA("dispatch-test", time.Hour)
	require.NoError(t, err)
	sc, sk, err := ca.Issue(pki.LeafRequest{CommonName: "cloudcore", Usage: pki.UsageServer, Hosts: []string{"127.0.0.1"}, Validity: time.Hour})
	require.NoError(t, err)
	cc, ck, err := ca.Issue(pki.LeafRequest{CommonName: "edge-1", Usage: pki.UsageClient, Validity: time.Hour})
	require.NoError(t, err)

	r := &rig{cat: &fakeCatalog{}, up: up, log: &countingHandler{}, edgeSerial: cc.SerialNumber.Text(16)}
	r.d, err = New(Deps{Catalog: r.cat, Upstream: up, Renewer: ren}, cfg, slog.New(r.log), prometheus.NewRegistry())
	require.NoError(t, err)
	opts.KeepAlive, opts.DeadPeerTimeout = 200*time.Millisecond, 5*time.Second
	opts.Logger = slog.New(slog.DiscardHandler)
	served := make(chan error, 1)
	srv, err := tunnel.NewServer(tunnel.ServerConfig{
		Options:  opts,
		QUICAddr: "127.0.0.1:0",
		TLS:      &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{sc.Raw}, PrivateKey: sk}}, ClientCAs: ca.Pool(), MinVersion: tls.VersionTLS13},
		Handler:  tunnel.HandlerFunc(func(ctx context.Context, s *tunnel.Session) { served <- r.d.Serve(ctx, s) }),
	})
	require.NoError(t, err)
	require.NoError(t, srv.Listen())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
	})
	client, err := tunnel.NewClient(tunnel.ClientConfig{
		Options: tunnel.Options{Logger: slog.New(slog.DiscardHandler)},
		Servers: []string{"quic://" + srv.QUICAddr().String()},
		Node:    "edge-1",
		TLS:     &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{cc.Raw}, PrivateKey: ck}}, RootCAs: ca.Pool(), MinVersion: tls.VersionTLS13},
	})
	require.NoError(t, err)
	dctx, dcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer dcancel()
	r.edge, err = client.Dial(dctx)
	require.NoError(t, err)
	t.Cleanup(func() {
		require.NoError(t, r.edge.Close("test done"))
		require.NoError(t, <-served, "Serve ends cleanly with the session")
	})
	return r
}

func (r *rig) send(t *testing.T, m *message.Message) uint64 {
	t.Helper()
	r.ids++
	m.ID = r.ids
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	require.NoError(t, r.edge.Send(ctx, m))
	return m.ID
}

func (r *rig) sendSync(t *testing.T, p objsync.Sync) uint64 {
	t.Helper()
	b, err := message.NewCodec(0).Append(nil, &p)
	require.NoError(t, err)
	return r.send(t, &message.Message{Kind: message.KindSync, Payload: b})
}

func (r *rig) upstream(t *testing.T, name string) uint64 {
	t.Helper()
	return r.send(t, &message.Message{Kind: message.KindUpstream, Op: message.OpStatus, Resource: message.Resource{Version: "v1", Kind: "Node", Name: name}})
}

// recv returns the next message from the cloud; the test fails when none
// arrives within 5 s or the session ends.
func (r *rig) recv(t *testing.T) *message.Message {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	m, err := r.edge.Recv(ctx)
	require.NoError(t, err, "waiting for a message from the cloud")
	return m
}

func syncOf(t *testing.T, m *message.Message) objsync.Sync {
	t.Helper()
	require.Equal(t, message.KindSync, m.Kind)
	var p objsync.Sync
	require.NoError(t, message.NewCodec(0).UnmarshalValue(m.Payload, &p))
	require.NoError(t, p.Validate())
	return p
}

func retryOf(t *testing.T, m *message.Message) message.Retry {
	t.Helper()
	require.Equal(t, message.KindRetry, m.Kind)
	var p message.Retry
	require.NoError(t, message.NewCodec(0).UnmarshalValue(m.Payload, &p))
	return p
}

// emptyDigest is what an edge that holds nothing sends.
func emptyDigest() objsync.Sync {
	return objsync.Sync{Phase: objsync.PhaseDigest, Buckets: make([]uint64, 1)}
}

var nodeGR = schema.GroupResource{Resource: "nodes"}

func TestServeAnswersEveryUpstreamOnce(t *testing.T) {
	up := &fakeUpstream{errs: map[string]error{
		"forbidden":   fmt.Errorf("write node of another: %w", ErrForbidden),
		"rejected":    fmt.Errorf("pod gone: %w", ErrRejected),
		"internal":    fmt.Errorf("update node: %w", apierrors.NewInternalError(fmt.Errorf("etcd down"))),
		"throttled":   fmt.Errorf("update node: %w", apierrors.NewTooManyRequests("slow down", 3)),
		"timeout":     apierrors.NewServerTimeout(nodeGR, "update", 2),
		"conflict":    apierrors.NewConflict(nodeGR, "conflict", fmt.Errorf("changed")),
		"unavailable": context.DeadlineExceeded,
	}}
	r := newRig(t, Config{}, up, nil, tunnel.Options{})
	want := map[uint64]struct {
		kind  message.Kind
		after uint32
	}{}
	for _, name := range []string{"ok", "forbidden", "rejected", "internal", "throttled", "timeout", "conflict", "unavailable"} {
		kind, after := message.KindRetry, uint32(0)
		switch name {
		case "ok":
			kind = message.KindAck
		case "forbidden", "rejected":
			kind = message.KindRefuse
		case "throttled":
			after = 3000
		case "timeout":
			after = 2000
		}
		want[r.upstream(t, name)] = struct {
			kind  message.Kind
			after uint32
		}{kind, after}
	}
	// The writer answers in order: once the last write's answer is in,
	// any second answer to an earlier one would have come before it.
	last := r.upstream(t, "ok")
	got := map[uint64]int{}
	for {
		m := r.recv(t)
		got[m.ReplyTo]++
		if m.ReplyTo == last {
			require.Equal(t, message.KindAck, m.Kind)
			break
		}
		w, ok := want[m.ReplyTo]
		require.True(t, ok, "answer to an unknown id %d", m.ReplyTo)
		require.Equal(t, w.kind, m.Kind, "answer to %d", m.ReplyTo)
		if m.Kind == message.KindRetry {
			require.Equal(t, w.after, retryOf(t, m).AfterMillis, "the API server's delay is passed on")
		}
	}
	for id := range want {
		require.Equal(t, 1, got[id], "exactly one answer to upstream %d", id)
	}
	require.EqualValues(t, 9, up.calls.Load())
	m := r.d.metrics.upstream
	require.Equal(t, 2.0, testutil.ToFloat64(m.WithLabelValues("ok")))
	require.Equal(t, 1.0, testutil.ToFloat64(m.WithLabelValues("forbidden")))
	require.Equal(t, 1.0, testutil.ToFloat64(m.WithLabelValues("rejected")))
	require.Equal(t, 5.0, testutil.ToFloat64(m.WithLabelValues("retry")))
}

func TestServeRateLimitsUpstreamPerSession(t *testing.T) {
	up := &fakeUpstream{}
	// A token every 100 s: the test never sees one come back.
	r := newRig(t, Config{UpstreamQPS: 0.01, UpstreamBurst: 2}, up, nil, tunnel.Options{})
	ids := make([]uint64, 5)
	for i := range ids {
		ids[i] = r.upstream(t, fmt.Sprint("n", i))
	}
	kinds := map[message.Kind]int{}
	for range ids {
		m := r.recv(t)
		kinds[m.Kind]++
		if m.Kind == message.KindRetry {
			p := retryOf(t, m)
			require.Equal(t, "throttled", p.Reason)
			require.Greater(t, p.AfterMillis, uint32(90_000), "the limiter's delay is the hint")
		}
	}
	require.Equal(t, map[message.Kind]int{message.KindAck: 2, message.KindRetry: 3}, kinds)
	require.EqualValues(t, 2, up.calls.Load(), "a throttled write never reaches the API server")
	require.Equal(t, 3.0, testutil.ToFloat64(r.d.metrics.upstream.WithLabelValues("throttled")))
}

func TestServeSlowUpstreamDoesNotBlockSync(t *testing.T) {
	up := &fakeUpstream{started: make(chan string, 16), gate: make(chan struct{})}
	r := newRig(t, Config{UpstreamQueue: 2}, up, nil, tunnel.Options{})
	k := objsync.Key{Kind: "ConfigMap", Namespace: "default", Name: "cm"}
	r.cat.put(k, "1", []byte(`{}`))

	first := r.upstream(t, "first")
	require.Equal(t, "first", <-up.started, "the writer is now stuck in the API server")
	queued := []uint64{r.upstream(t, "q1"), r.upstream(t, "q2")}
	over := []uint64{r.upstream(t, "o1"), r.upstream(t, "o2")}
	for _, id := range over {
		m := r.recv(t)
		require.Equal(t, id, m.ReplyTo)
		require.Equal(t, "busy", retryOf(t, m).Reason, "a full queue is answered at once")
	}

	// Object sync goes on meanwhile.
	r.sendSync(t, emptyDigest())
	require.Equal(t, objsync.PhaseDone, syncOf(t, r.recv(t)).Phase)
	ev := r.recv(t)
	require.Equal(t, message.KindEvent, ev.Kind)
	require.Equal(t, "cm", ev.Resource.Name)

	close(up.gate)
	for _, id := range append([]uint64{first}, queued...) {
		m := r.recv(t)
		require.Equal(t, message.KindAck, m.Kind)
		require.Equal(t, id, m.ReplyTo)
	}
}

func TestServeOversizeObjectIsRefusedNotFatal(t *testing.T) {
	r := newRig(t, Config{}, &fakeUpstream{}, nil, tunnel.Options{MaxFrame: 64 << 10})
	big := objsync.Key{Kind: "Secret", Namespace: "default", Name: "big"}
	small := objsync.Key{Kind: "ConfigMap", Namespace: "default", Name: "small"}
	r.cat.put(big, "1", make([]byte, 100<<10))
	r.cat.put(small, "1", []byte(`{}`))

	r.sendSync(t, emptyDigest())
	require.Equal(t, objsync.PhaseDone, syncOf(t, r.recv(t)).Phase)
	ev := r.recv(t)
	require.Equal(t, "small", ev.Resource.Name, "the big one is never sent")
	r.send(t, &message.Message{Kind: message.KindAck, ReplyTo: ev.ID})
	require.Eventually(t, func() bool {
		return testutil.ToFloat64(r.d.metrics.refused.WithLabelValues("too_large")) == 1
	}, 5*time.Second, 10*time.Millisecond)

	// The session is alive: a change of the small one still arrives.
	r.cat.put(small, "2", []byte(`{"v":2}`))
	r.d.Notify("edge-1", small)
	ev2 := r.recv(t)
	require.Equal(t, "small", ev2.Resource.Name)
	require.Equal(t, "2", ev2.Version)
	require.Greater(t, ev2.ID, ev.ID)
}

func TestServeIDsIncreaseAcrossDigests(t *testing.T) {
	r := newRig(t, Config{}, &fakeUpstream{}, nil, tunnel.Options{})
	for i := range 3 {
		r.cat.put(objsync.Key{Kind: "ConfigMap", Namespace: "default", Name: fmt.Sprint("cm-", i)}, "1", []byte(`{}`))
	}
	var ids []uint64
	for range 2 { // the same session reconciles twice
		r.sendSync(t, emptyDigest())
		for range 4 { // done and three events
			m := r.recv(t)
			ids = append(ids, m.ID)
			if m.Kind == message.KindEvent {
				r.send(t, &message.Message{Kind: message.KindAck, ReplyTo: m.ID})
			}
		}
	}
	require.True(t, slices.IsSorted(ids) && len(slices.Compact(slices.Clone(ids))) == len(ids), "ids strictly increase within the session: %v", ids)
}

func TestServeSplitsListsAndPrunes(t *testing.T) {
	const maxEntries = 100
	r := newRig(t, Config{MaxEntries: maxEntries}, &fakeUpstream{}, nil, tunnel.Options{})
	r.cat.put(objsync.Key{Kind: "ConfigMap", Namespace: "default", Name: "keep"}, "1", []byte(`{}`))
	// The edge holds 250 objects the cloud no longer wants.
	e := edgeSim{}
	for i := range 250 {
		e[pod(i)] = "1"
	}
	d := e.digest()
	r.sendSync(t, d)
	want := syncOf(t, r.recv(t))
	require.Equal(t, objsync.PhaseWant, want.Phase)
	list := e.list(want.Buckets, len(d.Buckets))
	for chunk := range slices.Chunk(list.Entries, maxEntries) {
		r.sendSync(t, objsync.Sync{Phase: objsync.PhaseList, Entries: chunk, More: true})
	}
	r.sendSync(t, objsync.Sync{Phase: objsync.PhaseList})

	pruned := map[uint64]bool{}
	var prunes int
	var lastID uint64
	for {
		m := r.recv(t)
		require.Greater(t, m.ID, lastID)
		lastID = m.ID
		if m.Kind == message.KindEvent {
			continue
		}
		p := syncOf(t, m)
		if p.Phase == objsync.PhaseDone {
			break
		}
		require.Equal(t, objsync.PhasePrune, p.Phase)
		require.LessOrEqual(t, len(p.Hashes), maxEntries)
		prunes++
		for _, h := range p.Hashes {
			pruned[h] = true
		}
		r.send(t, &message.Message{Kind: message.KindAck, ReplyTo: m.ID})
	}
	require.Equal(t, 3, prunes)
	require.Len(t, pruned, 250, "every object the edge listed is pruned")
}

func TestServeRefusalsAreCountedAndLogRateLimited(t *testing.T) {
	r := newRig(t, Config{}, &fakeUpstream{}, nil, tunnel.Options{})
	for range 10 {
		r.send(t, &message.Message{Kind: message.KindUpstream, Op: message.OpStatus, Node: "edge-2", Resource: message.Resource{Kind: "Node", Name: "edge-2"}})
		m := r.recv(t)
		require.Equal(t, message.KindRefuse, m.Kind)
	}
	for range 10 {
		r.send(t, &message.Message{Kind: message.KindRefuse, ReplyTo: 12345, Payload: []byte("bad event")})
	}
	require.Eventually(t, func() bool { return testutil.ToFloat64(r.d.metrics.edgeRefused) == 10 }, 5*time.Second, 10*time.Millisecond)
	require.Equal(t, 10.0, testutil.ToFloat64(r.d.metrics.refused.WithLabelValues("node_mismatch")))
	require.EqualValues(t, 2, r.log.warns.Load(), "one log line per cause")
}

// fakeRenewer signs with a test CA; the real renewer (cloudcore/onboard)
// is tested against a real API server.
type fakeRenewer struct {
	ca     *pki.CA
	serial chan string
}

func (f *fakeRenewer) Renew(_ context.Context, node, currentSerial string, _ []byte) (*x509.Certificate, error) {
	f.serial <- currentSerial
	if node != "edge-1" {
		return nil, errors.New("unknown node")
	}
	cert, _, err := f.ca.Issue(pki.LeafRequest{CommonName: node, Usage: pki.UsageClient, Validity: time.Hour})
	return cert, err
}

func TestServeRenewal(t *testing.T) {
	t.Run("no renewer", func(t *testing.T) {
		r := newRig(t, Config{}, &fakeUpstream{}, nil, tunnel.Options{})
		id := r.send(t, &message.Message{Kind: message.KindRenew, Payload: []byte("csr")})
		m := r.recv(t)
		require.Equal(t, message.KindRefuse, m.Kind)
		require.Equal(t, id, m.ReplyTo)
		require.Equal(t, 1.0, testutil.ToFloat64(r.d.metrics.refused.WithLabelValues("renew_refused")))
	})
	t.Run("renewed", func(t *testing.T) {
		ca, err := pki.NewCA("renew-test", time.Hour)
		require.NoError(t, err)
		f := &fakeRenewer{ca: ca, serial: make(chan string, 1)}
		r := newRig(t, Config{}, &fakeUpstream{}, f, tunnel.Options{})
		id := r.send(t, &message.Message{Kind: message.KindRenew, Payload: []byte("csr")})
		m := r.recv(t)
		require.Equal(t, message.KindRenew, m.Kind)
		require.Equal(t, id, m.ReplyTo)
		block, _ := pem.Decode(m.Payload)
		require.NotNil(t, block)
		_, err = x509.ParseCertificate(block.Bytes)
		require.NoError(t, err)
		require.Equal(t, r.edgeSerial, <-f.serial, "the renewer is told the session's certificate serial")
	})
}

func TestNew(t *testing.T) {
	deps := Deps{Catalog: &fakeCatalog{}, Upstream: &fakeUpstream{}}
	d, err := New(deps, Config{}, nil, nil)
	require.NoError(t, err, "nil logger and registry are allowed")
	require.NotNil(t, d.logger)
	reg := prometheus.NewRegistry()
	_, err = New(deps, Config{}, nil, reg)
	require.NoError(t, err)
	_, err = New(deps, Config{}, nil, reg)
	require.Error(t, err, "a metric registered twice is an error, not a panic")
	_, err = New(Deps{Catalog: &fakeCatalog{}}, Config{}, nil, nil)
	require.Error(t, err)
}

func TestServeDeleteAfterUnackedLargeSend(t *testing.T) {
	r := newRig(t, Config{ResendAfter: 100 * time.Millisecond}, &fakeUpstream{}, nil, tunnel.Options{})
	big := objsync.Key{Kind: "Secret", Namespace: "default", Name: "big"}
	r.cat.put(big, "1", make([]byte, 40<<10)) // over 32 KiB: its own QUIC stream
	r.sendSync(t, emptyDigest())
	// Done and the upsert, in either order: the upsert takes its own stream.
	up := r.recv(t)
	if up.Kind == message.KindSync {
		require.Equal(t, objsync.PhaseDone, syncOf(t, up).Phase)
		up = r.recv(t)
	}
	require.Equal(t, message.OpUpsert, up.Op)

	// Not acked (the edge has not committed it yet, or it is still on its
	// way) when the Secret is deleted: the cloud cannot know whether the
	// edge will hold it, so a delete follows, under a higher id.
	r.cat.mu.Lock()
	delete(r.cat.objs, big)
	r.cat.mu.Unlock()
	r.d.Notify("edge-1", big)
	last := up.ID
	for {
		m := r.recv(t)
		if m.Kind == message.KindSync {
			require.Equal(t, objsync.PhaseDone, syncOf(t, m).Phase, "a done that came after the upsert")
			continue
		}
		require.Greater(t, m.ID, last)
		last = m.ID
		if m.Op == message.OpDelete {
			require.Equal(t, "big", m.Resource.Name)
			break
		}
		require.Equal(t, message.OpUpsert, m.Op, "only resends of the upsert before the delete")
	}
}

// sessionGoroutines counts the goroutines running the dispatcher's code
// (not the test's own), from a dump of every goroutine's stack.
func sessionGoroutines() int {
	var dump strings.Builder
	_ = pprof.Lookup("goroutine").WriteTo(&dump, 2) // cannot fail on a strings.Builder
	n := 0
	for g := range strings.SplitSeq(dump.String(), "\n\n") {
		if dispatchFrame.MatchString(g) {
			n++
		}
	}
	return n
}

// dispatchFrame matches a frame of the dispatcher's session code.
var dispatchFrame = regexp.MustCompile(`cloudcore/dispatch\.\(\*(Dispatcher|conn|objects|upstreamHandler|renewal|lane)\)\.`)

// TestServeGoroutines: an idle session holds one goroutine of the
// dispatcher (Serve's own); an upstream write or a
// renewal starts one more while it waits on the API server, which exits
// once answered.
func TestServeGoroutines(t *testing.T) {
	ca, err := pki.NewCA("renew-test", time.Hour)
	require.NoError(t, err)
	ren := &fakeRenewer{ca: ca, serial: make(chan string, 1)}
	up := &fakeUpstream{started: make(chan string, 1), gate: make(chan struct{})}
	r := newRig(t, Config{}, up, ren, tunnel.Options{})
	r.cat.put(pod(1), "1", []byte(`{}`))
	r.sendSync(t, emptyDigest())
	require.Equal(t, objsync.PhaseDone, syncOf(t, r.recv(t)).Phase)
	ev := r.recv(t)
	require.Equal(t, message.KindEvent, ev.Kind)
	r.send(t, &message.Message{Kind: message.KindAck, ReplyTo: ev.ID})
	require.Eventually(t, func() bool { return testutil.ToFloat64(r.d.metrics.acksPending) == 0 }, 10*time.Second, 5*time.Millisecond)
	idle := func() bool { return sessionGoroutines() == 1 }
	require.Eventually(t, idle, 10*time.Second, 10*time.Millisecond, "an idle session holds Serve's goroutine only, got %d", sessionGoroutines())

	// An upstream write waits on the API server: one goroutine more.
	id := r.upstream(t, "slow")
	require.Equal(t, "slow", <-up.started)
	require.Equal(t, 2, sessionGoroutines(), "the upstream lane runs while a write waits")
	close(up.gate)
	m := r.recv(t)
	require.Equal(t, id, m.ReplyTo)
	require.Equal(t, message.KindAck, m.Kind)
	require.Eventually(t, idle, 10*time.Second, 10*time.Millisecond, "the lane exits once its queue is empty")

	// A renewal, the same.
	id = r.send(t, &message.Message{Kind: message.KindRenew, Payload: []byte("csr")})
	m = r.recv(t)
	require.Equal(t, id, m.ReplyTo)
	require.Equal(t, message.KindRenew, m.Kind)
	<-ren.serial
	require.Eventually(t, idle, 10*time.Second, 10*time.Millisecond, "the renewal lane exits once answered")
}
