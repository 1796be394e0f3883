package whitelist_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"

	"github.com/tetheredge/tether/cloudcore/edgenode"
	"github.com/tetheredge/tether/cloudcore/whitelist"
	"github.com/tetheredge/tether/tests/controlplane"
	"github.com/tetheredge/tether/tunnel"
)

var cp controlplane.Shared

func TestMain(m *testing.M) { os.Exit(cp.RunChecked(m)) }

const waitFor = 15 * time.Second

type fixture struct {
	nodes *edgenode.Client
	dyn   dynamic.Interface // the whitelist's client, its requests logged
	reqs  *requestLog
	wl    *whitelist.Whitelist
	now   atomic.Pointer[time.Time]

	mu      sync.Mutex
	changes []string
}

// start runs a whitelist, with a clock the test moves, over the shared
// apiserver.
func start(t *testing.T) *fixture {
	t.Helper()
	cfg := rest.CopyConfig(cp.Env(t).Config)
	cfg.QPS, cfg.Burst = 1000, 1000
	admin, err := dynamic.NewForConfig(cfg)
	require.NoError(t, err)
	reqs := &requestLog{}
	cfg.Wrap(func(rt http.RoundTripper) http.RoundTripper { reqs.next = rt; return reqs })
	dyn, err := dynamic.NewForConfig(cfg)
	require.NoError(t, err)
	f := &fixture{nodes: edgenode.NewClient(admin), dyn: dyn, reqs: reqs}
	now := time.Now()
	f.now.Store(&now)
	f.wl = whitelist.New(dyn, nil, func() time.Time { return *f.now.Load() })
	f.wl.OnChange(func(node string) {
		f.mu.Lock()
		f.changes = append(f.changes, node)
		f.mu.Unlock()
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.wl.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
	})
	require.NoError(t, f.wl.WaitForSync(t.Context()))
	return f
}

// requestLog records the writes (not the informer's list and watch) of
// the whitelist's client.
type requestLog struct {
	mu     sync.Mutex
	writes []string
	next   http.RoundTripper
}

func (l *requestLog) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Method != http.MethodGet {
		l.mu.Lock()
		l.writes = append(l.writes, r.Method+" "+r.URL.Path)
		l.mu.Unlock()
	}
	return l.next.RoundTrip(r)
}

// of returns the writes recorded of EdgeNode name.
func (l *requestLog) of(name string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, w := range l.writes {
		if strings.Contains(w, "/edgenodes/"+name+"/") || strings.HasSuffix(w, "/edgenodes/"+name) {
			out = append(out, w)
		}
	}
	return out
}

// connectionWriter runs a ConnectionWriter as CloudCore wires it: over
// the whitelist's client and cache, until the test (or stop) ends it.
func (f *fixture) connectionWriter(t *testing.T, replica string) (w *edgenode.ConnectionWriter, stop func()) {
	t.Helper()
	w, err := edgenode.NewConnectionWriter(edgenode.NewClient(f.dyn), edgenode.ConnectionWriterConfig{Replica: replica, Get: f.wl.Get})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); require.NoError(t, <-done) }) }
	t.Cleanup(stop)
	return w, stop
}

func (f *fixture) advance(d time.Duration) {
	n := f.now.Load().Add(d)
	f.now.Store(&n)
}

func (f *fixture) changed(node string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, c := range f.changes {
		if c == node {
			n++
		}
	}
	return n
}

// create writes an EdgeNode with a certificate on record and waits until
// the whitelist has it.
func (f *fixture) create(t *testing.T, allowed bool, cert, prev *edgenode.Certificate) *edgenode.EdgeNode {
	t.Helper()
	name := "wl-" + strings.ToLower(rand.Text()[:8])
	t.Cleanup(func() {
		if err := f.nodes.Delete(context.Background(), name); err != nil && !apierrors.IsNotFound(err) {
			t.Errorf("delete %s: %v", name, err)
		}
	})
	e, err := f.nodes.Create(t.Context(), &edgenode.EdgeNode{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: edgenode.Spec{Allowed: allowed}})
	require.NoError(t, err)
	e.Status.Certificate, e.Status.Previous = cert, prev
	e, err = f.nodes.UpdateStatus(t.Context(), e)
	require.NoError(t, err)
	f.waitVersion(t, e)
	return e
}

func (f *fixture) waitVersion(t *testing.T, e *edgenode.EdgeNode) {
	t.Helper()
	require.Eventually(t, func() bool {
		got, ok := f.wl.Get(e.Name)
		return ok && got.ResourceVersion == e.ResourceVersion
	}, waitFor, 10*time.Millisecond)
}

func cert(serial string, notAfter time.Time) *edgenode.Certificate {
	return &edgenode.Certificate{Serial: serial, NotAfter: metav1.NewTime(notAfter)}
}

func TestUntil(t *testing.T) {
	f := start(t)
	now := *f.now.Load()
	e := f.create(t, true, cert("c", now.Add(48*time.Hour)), cert("p", now.Add(time.Hour)))
	id := func(serial string, notAfter time.Time) tunnel.Identity {
		return tunnel.Identity{Node: e.Name, Serial: serial, NotAfter: notAfter}
	}

	until, err := f.wl.Until(id("c", now.Add(48*time.Hour)))
	require.NoError(t, err)
	require.WithinDuration(t, now.Add(48*time.Hour), until, time.Second)
	// Never past the certificate's own expiry.
	until, err = f.wl.Until(id("c", now.Add(time.Minute)))
	require.NoError(t, err)
	require.True(t, now.Add(time.Minute).Equal(until))
	until, err = f.wl.Until(id("p", now.Add(30*24*time.Hour)))
	require.NoError(t, err, "the previous certificate within its grace")
	require.WithinDuration(t, now.Add(time.Hour), until, time.Second)

	require.ErrorIs(t, f.wl.Authorize(id("x", now.Add(time.Hour))), whitelist.ErrNotAllowed)
	require.ErrorContains(t, f.wl.Authorize(tunnel.Identity{Node: "wl-absent", Serial: "c"}), "not on the whitelist")

	f.advance(2 * time.Hour)
	require.ErrorContains(t, f.wl.Authorize(id("p", now.Add(30*24*time.Hour))), "grace ended")
	require.NoError(t, f.wl.Authorize(id("c", now.Add(48*time.Hour))))
	f.advance(47 * time.Hour)
	require.ErrorContains(t, f.wl.Authorize(id("c", now.Add(48*time.Hour))), "expired")
}

// Before its cache has synced the whitelist knows no node: it must say it
// cannot tell yet, not that an allowed node is unknown (a CloudCore that
// answered handshakes then refused its own edges after a restart).
func TestUntilBeforeSync(t *testing.T) {
	f := start(t)
	e := f.create(t, true, cert("c", time.Now().Add(48*time.Hour)), nil)
	id := tunnel.Identity{Node: e.Name, Serial: "c", NotAfter: time.Now().Add(48 * time.Hour)}
	require.NoError(t, f.wl.Authorize(id), "the synced whitelist allows the node")

	unsynced := whitelist.New(f.dyn, nil, nil)
	_, err := unsynced.Until(id)
	require.ErrorIs(t, err, whitelist.ErrNotReady)
	require.NotErrorIs(t, err, whitelist.ErrNotAllowed, "not a refusal of the node")

	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- unsynced.Run(ctx) }()
	defer func() { cancel(); require.NoError(t, <-done) }()
	require.NoError(t, unsynced.WaitForSync(ctx))
	require.NoError(t, unsynced.Authorize(id))
}

// Every change of an EdgeNode reaches the subscribers, not only a
// disable: a superseded serial must end sessions too.
func TestOnChangeForEveryChange(t *testing.T) {
	f := start(t)
	now := *f.now.Load()
	e := f.create(t, true, cert("c", now.Add(time.Hour)), nil)
	require.Eventually(t, func() bool { return f.changed(e.Name) >= 1 }, waitFor, 10*time.Millisecond)

	base := f.changed(e.Name)
	e.Status.Certificate = cert("d", now.Add(time.Hour)) // a new join
	e, err := f.nodes.UpdateStatus(t.Context(), e)
	require.NoError(t, err)
	require.Eventually(t, func() bool { return f.changed(e.Name) == base+1 }, waitFor, 10*time.Millisecond)

	require.NoError(t, f.nodes.Delete(t.Context(), e.Name))
	require.Eventually(t, func() bool { return f.changed(e.Name) == base+2 }, waitFor, 10*time.Millisecond)
	require.ErrorContains(t, f.wl.Authorize(tunnel.Identity{Node: e.Name, Serial: "d"}), "not on the whitelist")
}

// A connection with the current certificate ends the previous one's grace
// at once, in one write; a connection with the previous one writes
// nothing (where and when a node connected is the connection writer's).
func TestConnectedEndsGrace(t *testing.T) {
	f := start(t)
	now := *f.now.Load()
	e := f.create(t, true, cert("c", now.Add(48*time.Hour)), cert("p", now.Add(time.Hour)))

	f.wl.Connected(tunnel.Identity{Node: e.Name, Serial: "p"})
	f.wl.Connected(tunnel.Identity{Node: e.Name, Serial: "c"})
	require.Eventually(t, func() bool {
		got, err := f.nodes.Get(t.Context(), e.Name)
		return err == nil && got.Status.Previous == nil
	}, waitFor, 10*time.Millisecond)
	require.Eventually(t, func() bool {
		return f.wl.Authorize(tunnel.Identity{Node: e.Name, Serial: "p", NotAfter: now.Add(time.Hour)}) != nil
	}, waitFor, 10*time.Millisecond)
	require.NoError(t, f.wl.Authorize(tunnel.Identity{Node: e.Name, Serial: "c", NotAfter: now.Add(48 * time.Hour)}))
	// Connections are taken in order: the one with the previous
	// certificate was handled before the grace ended.
	require.Len(t, f.reqs.of(e.Name), 1, "only the end of the grace is written")
}

// One connect is one EdgeNode write, the connection writer's: the
// connection and lastConnected together; the whitelist writes nothing
// unless a grace ends. (The whitelist used to patch lastConnected beside
// it: two writes per connect.)
func TestOneWritePerConnect(t *testing.T) {
	f := start(t)
	now := *f.now.Load()
	e := f.create(t, true, cert("c", now.Add(48*time.Hour)), nil)
	renewed := f.create(t, true, cert("c", now.Add(48*time.Hour)), cert("p", now.Add(time.Hour)))
	cw, _ := f.connectionWriter(t, "cloud-a")

	// As the hub and the dispatcher tell of a session that starts.
	id := tunnel.Identity{Node: e.Name, Serial: "c"}
	f.wl.Connected(id)
	cw.Started(e.Name, "s1", tunnel.TransportQUIC, nil, now)
	require.Eventually(t, func() bool {
		got, err := f.nodes.Get(t.Context(), e.Name)
		return err == nil && got.Status.Connection != nil && got.Status.LastConnected != nil
	}, waitFor, 10*time.Millisecond)
	// The whitelist takes connections in order: once it ended the grace of
	// a node that connected after, it has handled the first one.
	f.wl.Connected(tunnel.Identity{Node: renewed.Name, Serial: "c"})
	require.Eventually(t, func() bool {
		got, err := f.nodes.Get(t.Context(), renewed.Name)
		return err == nil && got.Status.Previous == nil
	}, waitFor, 10*time.Millisecond)
	require.Equal(t, []string{"PUT /apis/edge.tether.dev/v1alpha1/edgenodes/" + e.Name + "/status"}, f.reqs.of(e.Name))
	require.Len(t, f.reqs.of(renewed.Name), 1, "the end of a grace: one write")
}

// After a CloudCore restart (its sessions neither ended nor cleared:
// SIGKILL), each of n edges that reconnects costs one EdgeNode write: its
// new session replaces the dead one in the same write as lastConnected,
// and the object count, unchanged, is not written again.
func TestReconnectStormWrites(t *testing.T) {
	const n = 40
	f := start(t)
	now := *f.now.Load()
	nodes := make([]*edgenode.EdgeNode, n)
	for i := range nodes {
		nodes[i] = f.create(t, true, cert("c", now.Add(48*time.Hour)), nil)
	}
	connect := func(cw *edgenode.ConnectionWriter, session string, at time.Time) {
		for _, e := range nodes {
			f.wl.Connected(tunnel.Identity{Node: e.Name, Serial: "c"})
			cw.Started(e.Name, session, tunnel.TransportQUIC, nil, at)
			cw.Held(e.Name, session, 3)
		}
		require.Eventually(t, func() bool {
			for _, e := range nodes {
				got, ok := f.wl.Get(e.Name)
				if !ok || got.Status.Connection == nil || got.Status.Connection.Session != session || got.Status.ObjectsHeld == nil {
					return false
				}
			}
			return true
		}, waitFor, 10*time.Millisecond)
	}
	writes := func() int {
		total := 0
		for _, e := range nodes {
			total += len(f.reqs.of(e.Name))
		}
		return total
	}
	first, stop := f.connectionWriter(t, "cloud-a")
	connect(first, "before", now)
	stop() // killed: no session's end is written
	before := writes()

	restarted, _ := f.connectionWriter(t, "cloud-a")
	connect(restarted, "after", now.Add(30*time.Second))
	// Each node reconnected to one replica: its later count (unchanged)
	// is the last word, so once every node shows the new session, any
	// further write would be of a node already counted.
	for _, e := range nodes {
		got, ok := f.wl.Get(e.Name)
		require.True(t, ok)
		require.True(t, got.Status.LastConnected.Equal(&metav1.Time{Time: now.Add(30 * time.Second).Truncate(time.Second)}), "lastConnected of %s: %s", e.Name, got.Status.LastConnected)
	}
	require.Equal(t, n, writes()-before, fmt.Sprintf("EdgeNode writes for %d reconnects", n))
}
