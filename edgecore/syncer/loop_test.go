package syncer

import (
	"context"
	"crypto/tls"
	"database/sql"
	"errors"
	"log/slog"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	_ "github.com/mattn/go-sqlite3" // the driver behind sql.Open("sqlite3")
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/common/pki"
	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/tunnel"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// faultStore is the real store with Apply failing while fail > 0, the way
// a full disk fails it: nothing is written.
type faultStore struct {
	*store.Store
	fail    atomic.Int32
	commits atomic.Int32
}

var errDiskFull = errors.New("apply batch: commit: database or disk is full")

func (f *faultStore) Apply(ctx context.Context, changes []store.Change) error {
	if f.fail.Load() > 0 {
		f.fail.Add(-1)
		return errDiskFull
	}
	if err := f.Store.Apply(ctx, changes); err != nil {
		return err
	}
	f.commits.Add(1)
	return nil
}

// logCount counts log records by message.
type logCount struct {
	mu sync.Mutex
	n  map[string]int
}

func (l *logCount) Enabled(context.Context, slog.Level) bool { return true }
func (l *logCount) Handle(_ context.Context, r slog.Record) error {
	l.mu.Lock()
	l.n[r.Message]++
	l.mu.Unlock()
	return nil
}
func (l *logCount) WithAttrs([]slog.Attr) slog.Handler { return l }
func (l *logCount) WithGroup(string) slog.Handler      { return l }
func (l *logCount) count(msg string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.n[msg]
}

// rig is one edge (real SQLite store, syncer, tunnel client) connected
// over loopback QUIC to a scripted cloud: the test plays the cloud's side
// of each session it receives.
type rig struct {
	t        *testing.T
	path     string // the store's file
	st       *faultStore
	sy       *Syncer
	reg      *prometheus.Registry
	logs     *logCount
	sessions chan *tunnel.Session
}

func newRig(t *testing.T, cfg Config, maxFrame int, before func(*Syncer)) *rig {
	t.Helper()
	ca, err := pki.NewCA("syncer-test", time.Hour)
	require.NoError(t, err)
	srvCert, srvKey, err := ca.Issue(pki.LeafRequest{CommonName: "cloudcore", Usage: pki.UsageServer, Hosts: []string{"127.0.0.1"}, Validity: time.Hour})
	require.NoError(t, err)
	cliCert, cliKey, err := ca.Issue(pki.LeafRequest{CommonName: "edge-1", Usage: pki.UsageClient, Validity: time.Hour})
	require.NoError(t, err)

	ctx, cancel := context.WithCancel(context.Background())
	r := &rig{t: t, reg: prometheus.NewRegistry(), logs: &logCount{n: map[string]int{}}, sessions: make(chan *tunnel.Session, 4)}
	quiet := slog.New(slog.DiscardHandler)
	srv, err := tunnel.NewServer(tunnel.ServerConfig{
		Options:  tunnel.Options{Logger: quiet},
		QUICAddr: "127.0.0.1:0",
		TLS:      &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{srvCert.Raw}, PrivateKey: srvKey}}, ClientCAs: ca.Pool(), MinVersion: tls.VersionTLS13},
		Handler: tunnel.HandlerFunc(func(ctx context.Context, s *tunnel.Session) {
			r.sessions <- s
			select {
			case <-ctx.Done():
			case <-s.Done():
			}
		}),
	})
	require.NoError(t, err)
	require.NoError(t, srv.Listen())

	r.path = filepath.Join(t.TempDir(), "edge.db")
	st, err := store.Open(ctx, r.path, quiet)
	require.NoError(t, err)
	r.st = &faultStore{Store: st}
	r.sy, err = New(r.st, cfg, slog.New(r.logs), r.reg)
	require.NoError(t, err)
	if before != nil {
		before(r.sy)
	}
	client, err := tunnel.NewClient(tunnel.ClientConfig{
		Options: tunnel.Options{Logger: quiet, MaxFrame: maxFrame},
		Servers: []string{"quic://" + srv.QUICAddr().String()},
		Node:    "edge-1",
		TLS:     &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{cliCert.Raw}, PrivateKey: cliKey}}, RootCAs: ca.Pool(), MinVersion: tls.VersionTLS13},
		Backoff: tunnel.Backoff{Min: 10 * time.Millisecond, Max: 50 * time.Millisecond},
	})
	require.NoError(t, err)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); require.NoError(t, srv.Run(ctx)) }()
	go func() { defer wg.Done(); require.NoError(t, client.Run(ctx, r.sy.Serve)) }()
	t.Cleanup(func() {
		cancel()
		wg.Wait()
		require.NoError(t, st.Close())
	})
	return r
}

// cloud is the test's side of one session.
type cloud struct {
	t    *testing.T
	s    *tunnel.Session
	next uint64
}

func (r *rig) accept() *cloud {
	r.t.Helper()
	select {
	case s := <-r.sessions:
		return &cloud{t: r.t, s: s}
	case <-time.After(10 * time.Second):
		r.t.Fatal("no session")
		return nil
	}
}

// noReconnect checks that the edge kept its one session.
func (r *rig) noReconnect(c *cloud) {
	r.t.Helper()
	require.Empty(r.t, r.sessions, "the edge reconnected")
	require.NoError(r.t, c.s.Err(), "the session ended")
}

func (c *cloud) recv() *message.Message {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m, err := c.s.Recv(ctx)
	require.NoError(c.t, err)
	return m
}

func (c *cloud) send(m *message.Message) {
	c.t.Helper()
	if m.ID == 0 && m.Kind != message.KindAck && m.Kind != message.KindRefuse && m.Kind != message.KindRetry {
		c.next++
		m.ID = c.next
	}
	require.NoError(c.t, c.s.Send(context.Background(), m))
}

// reconcile takes the digest and answers Done: the edge is live.
func (c *cloud) reconcile() objsync.Sync {
	c.t.Helper()
	m := c.recv()
	require.Equal(c.t, message.KindSync, m.Kind)
	var d objsync.Sync
	require.NoError(c.t, message.NewCodec(0).UnmarshalValue(m.Payload, &d))
	require.Equal(c.t, objsync.PhaseDigest, d.Phase)
	c.send(syncMsg(c.t, 0, objsync.Sync{Phase: objsync.PhaseDone}))
	return d
}

// TestServeAcksAfterCommitAndRetriesFailedApply: on a real tunnel and a
// real store, an ack arrives only once its event is committed; Apply
// failing (a full disk) sends no ack and does not end the session, and the
// events are applied later and acked.
func TestServeAcksAfterCommitAndRetriesFailedApply(t *testing.T) {
	r := newRig(t, Config{StoreRetryMin: 5 * time.Millisecond, StoreRetryMax: 20 * time.Millisecond}, 0, nil)
	c := r.accept()
	c.reconcile()
	r.st.fail.Store(4)
	c.send(upsert(10, "a", "1"))
	c.send(upsert(11, "b", "1"))
	c.send(upsert(12, "c", "1"))
	for range 3 {
		m := c.recv()
		require.Equal(t, message.KindAck, m.Kind)
		require.Zero(t, r.st.fail.Load(), "ack %d before the failures were over", m.ReplyTo)
		name := map[uint64]string{10: "a", 11: "b", 12: "c"}[m.ReplyTo]
		_, ok, err := r.st.Get(context.Background(), podKey(name))
		require.NoError(t, err)
		require.True(t, ok, "ack %d before its commit", m.ReplyTo)
	}
	require.Equal(t, 4.0, testutil.ToFloat64(r.sy.metrics.storeErrors.WithLabelValues("apply")))
	r.noReconnect(c)
}

// TestServeRetriesBusyStore: a real transient fault. Another connection
// holds the store's write lock, so Apply fails with SQLITE_BUSY after the
// store's busy timeout; the event is retried within the session and acked
// once the lock is released, without a reconnect.
func TestServeRetriesBusyStore(t *testing.T) {
	r := newRig(t, Config{StoreRetryMin: 10 * time.Millisecond, StoreRetryMax: 50 * time.Millisecond}, 0, nil)
	c := r.accept()
	c.reconcile()
	ctx := context.Background()
	db, err := sql.Open("sqlite3", "file:"+r.path+"?_busy_timeout=0")
	require.NoError(t, err)
	defer db.Close()
	conn, err := db.Conn(ctx)
	require.NoError(t, err)
	_, err = conn.ExecContext(ctx, "BEGIN IMMEDIATE")
	require.NoError(t, err)
	c.send(upsert(1, "a", "1"))
	applyErrors := r.sy.metrics.storeErrors.WithLabelValues("apply")
	require.Eventually(t, func() bool { return testutil.ToFloat64(applyErrors) >= 1 }, 20*time.Second, 10*time.Millisecond)
	_, ok, err := r.st.Get(ctx, podKey("a"))
	require.NoError(t, err)
	require.False(t, ok)
	_, err = conn.ExecContext(ctx, "ROLLBACK")
	require.NoError(t, err)
	require.NoError(t, conn.Close())
	m := c.recv()
	require.Equal(t, message.KindAck, m.Kind)
	require.Equal(t, uint64(1), m.ReplyTo)
	_, ok, err = r.st.Get(ctx, podKey("a"))
	require.NoError(t, err)
	require.True(t, ok)
	r.noReconnect(c)
}

// TestServeStaleEvents: the edge half of defect 6 through the loop. An
// older event for a key is acked and not applied; a delete is not undone
// by an older upsert.
func TestServeStaleEvents(t *testing.T) {
	r := newRig(t, Config{}, 0, nil)
	c := r.accept()
	c.reconcile()
	ctx := context.Background()
	for _, m := range []*message.Message{upsert(5, "a", "5"), upsert(3, "a", "3"), del(7, "b"), upsert(6, "b", "6")} {
		c.send(m)
		a := c.recv()
		require.Equal(t, message.KindAck, a.Kind)
		require.Equal(t, m.ID, a.ReplyTo)
	}
	o, ok, err := r.st.Get(ctx, podKey("a"))
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, "5", o.Version)
	_, ok, err = r.st.Get(ctx, podKey("b"))
	require.NoError(t, err)
	require.False(t, ok, "the deleted object stays deleted")
	require.Equal(t, 2.0, testutil.ToFloat64(r.sy.metrics.stale))
}

func nodeItem() store.OutboxItem {
	return store.OutboxItem{Op: message.OpUpsert, Resource: message.Resource{Version: "v1", Kind: "Node", Name: "edge-1"}, Data: []byte(`{"kind":"Node"}`)}
}

// TestServeUpstreamRetryRefuse: the edge half of defect 4 through the
// loop. The cloud answers 200 Retry in a row within one session, then
// acks: the lease still goes out and leaves the outbox. A refused item is
// dropped, logged once and never sent again.
func TestServeUpstreamRetryRefuse(t *testing.T) {
	ctx := context.Background()
	r := newRig(t, Config{RetryMin: time.Millisecond, RetryMax: 2 * time.Millisecond}, 0, func(sy *Syncer) {
		require.NoError(t, sy.Publish(ctx, nodeItem()))
		require.NoError(t, sy.Publish(ctx, lease("edge-1")))
	})
	c := r.accept()
	c.reconcile()
	retry, err := message.NewCodec(0).Append(nil, &message.Retry{Reason: "apiserver 503"})
	require.NoError(t, err)
	retries, nodeSent := 0, 0
	for {
		m := c.recv()
		require.Equal(t, message.KindUpstream, m.Kind)
		if m.Resource.Kind == "Node" {
			nodeSent++
			require.Equal(t, 1, nodeSent, "the refused node is sent once")
			c.send(&message.Message{Kind: message.KindRefuse, ReplyTo: m.ID, Payload: []byte("forbidden: label node-role.kubernetes.io/control-plane")})
			continue
		}
		if retries < 200 {
			retries++
			c.send(&message.Message{Kind: message.KindRetry, ReplyTo: m.ID, Payload: retry})
			continue
		}
		c.send(&message.Message{Kind: message.KindAck, ReplyTo: m.ID})
		break
	}
	require.Eventually(t, func() bool {
		n, err := r.st.PendingCount(ctx)
		return err == nil && n == 0
	}, 10*time.Second, 5*time.Millisecond, "the outbox empties")
	require.Equal(t, 1, r.logs.count("cloud refused an upstream write; dropping it"))
	up := r.sy.metrics.upstream
	require.Equal(t, 200.0, testutil.ToFloat64(up.WithLabelValues("retried")))
	require.Equal(t, 1.0, testutil.ToFloat64(up.WithLabelValues("acked")))
	require.Equal(t, 1.0, testutil.ToFloat64(up.WithLabelValues("refused")))
	r.noReconnect(c)
}

// TestServeDropsOversizeUpstream: an outbox item larger than the frame
// limit is dropped (logged, counted) and the next item is sent on the
// same session; defect 12.
func TestServeDropsOversizeUpstream(t *testing.T) {
	ctx := context.Background()
	r := newRig(t, Config{}, 64<<10, func(sy *Syncer) {
		big := store.OutboxItem{Op: message.OpStatus, Resource: message.Resource{Version: "v1", Kind: "Pod", Namespace: "d", Name: "big"}, Data: make([]byte, 100<<10)}
		big.Data[0], big.Data[len(big.Data)-1] = '"', '"'
		for i := 1; i < len(big.Data)-1; i++ {
			big.Data[i] = 'x'
		}
		require.NoError(t, sy.Publish(ctx, big))
		require.NoError(t, sy.Publish(ctx, lease("edge-1")))
	})
	c := r.accept()
	c.reconcile()
	m := c.recv()
	require.Equal(t, "Lease", m.Resource.Kind)
	c.send(&message.Message{Kind: message.KindAck, ReplyTo: m.ID})
	require.Eventually(t, func() bool {
		n, err := r.st.PendingCount(ctx)
		return err == nil && n == 0
	}, 10*time.Second, 5*time.Millisecond)
	require.Equal(t, 1.0, testutil.ToFloat64(r.sy.metrics.upstream.WithLabelValues("too_large")))
	require.Equal(t, 1, r.logs.count("upstream write exceeds the frame limit; dropping it"))
	r.noReconnect(c)
}

// TestServeRenew: a renewal answer reaches Renew; a refusal is an error.
func TestServeRenew(t *testing.T) {
	r := newRig(t, Config{}, 0, nil)
	_, err := r.sy.Renew(context.Background(), []byte("csr"))
	require.ErrorIs(t, err, ErrOffline)
	c := r.accept()
	c.reconcile()
	for _, answer := range []message.Kind{message.KindRenew, message.KindRefuse} {
		done := make(chan struct{})
		var got []byte
		var rerr error
		go func() {
			defer close(done)
			got, rerr = r.sy.Renew(context.Background(), []byte("csr"))
		}()
		m := c.recv()
		require.Equal(t, message.KindRenew, m.Kind)
		require.Equal(t, []byte("csr"), m.Payload)
		c.send(&message.Message{Kind: answer, ReplyTo: m.ID, Payload: []byte("CERT or reason")})
		<-done
		if answer == message.KindRenew {
			require.NoError(t, rerr)
			require.Equal(t, []byte("CERT or reason"), got)
		} else {
			require.ErrorContains(t, rerr, "CERT or reason")
		}
	}
}

// TestServeListInChunks: a want over a store holding more entries than
// one List may carry is answered in chunks, More on all but the last, that
// arrive in order; defect 10, on a real store and tunnel. (Chunks of
// MaxEntries fail it: the first, 1.9 MB, travels on its own QUIC stream
// and arrives after the last.)
func TestServeListInChunks(t *testing.T) {
	r := newRig(t, Config{}, 0, func(sy *Syncer) {
		n := objsync.MaxEntries + 10
		changes := make([]store.Change, n)
		for i := range changes {
			m := upsert(0, "p-"+strconv.Itoa(i), "1")
			changes[i] = store.Change{Op: message.OpUpsert, Object: store.Object{Resource: m.Resource, Version: m.Version, Data: m.Payload}}
		}
		require.NoError(t, sy.store.Apply(context.Background(), changes))
	})
	c := r.accept()
	m := c.recv()
	var d objsync.Sync
	codec := message.NewCodec(0)
	require.NoError(t, codec.UnmarshalValue(m.Payload, &d))
	require.Equal(t, uint32(objsync.MaxEntries+10), d.Count)
	all := make([]uint64, len(d.Buckets))
	for i := range all {
		all[i] = uint64(i)
	}
	c.send(syncMsg(t, 0, objsync.Sync{Phase: objsync.PhaseWant, Buckets: all}))
	var sizes []int
	var more []bool
	for {
		m := c.recv()
		var l objsync.Sync
		require.NoError(t, codec.UnmarshalValue(m.Payload, &l))
		require.Equal(t, objsync.PhaseList, l.Phase)
		require.NoError(t, l.Validate())
		sizes, more = append(sizes, len(l.Entries)), append(more, l.More)
		if !l.More {
			break
		}
	}
	// Chunks of the default 1024 entries, each small enough for the
	// ordered control stream, so they arrive in order.
	require.Len(t, sizes, (objsync.MaxEntries+10+1023)/1024)
	total := 0
	for i, n := range sizes {
		total += n
		require.Equal(t, i < len(sizes)-1, more[i], "chunk %d", i)
		if i < len(sizes)-1 {
			require.Equal(t, 1024, n)
		}
	}
	require.Equal(t, objsync.MaxEntries+10, total)
}
