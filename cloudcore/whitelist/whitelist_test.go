package whitelist_test

import (
	"context"
	"crypto/rand"
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
	dyn, err := dynamic.NewForConfig(cfg)
	require.NoError(t, err)
	f := &fixture{nodes: edgenode.NewClient(dyn)}
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
// at once; connections are otherwise recorded at most once a minute.
func TestConnectedEndsGrace(t *testing.T) {
	f := start(t)
	now := *f.now.Load()
	e := f.create(t, true, cert("c", now.Add(48*time.Hour)), cert("p", now.Add(time.Hour)))

	// With the previous certificate: recorded, the grace goes on.
	f.wl.Connected(tunnel.Identity{Node: e.Name, Serial: "p"})
	require.Eventually(t, func() bool {
		got, err := f.nodes.Get(t.Context(), e.Name)
		return err == nil && got.Status.LastConnected != nil
	}, waitFor, 10*time.Millisecond)
	got, err := f.nodes.Get(t.Context(), e.Name)
	require.NoError(t, err)
	require.NotNil(t, got.Status.Previous)
	f.waitVersion(t, got)

	// With the current one, within the same minute: the grace ends anyway.
	f.wl.Connected(tunnel.Identity{Node: e.Name, Serial: "c"})
	require.Eventually(t, func() bool {
		got, err := f.nodes.Get(t.Context(), e.Name)
		return err == nil && got.Status.Previous == nil
	}, waitFor, 10*time.Millisecond)
	require.Eventually(t, func() bool {
		return f.wl.Authorize(tunnel.Identity{Node: e.Name, Serial: "p", NotAfter: now.Add(time.Hour)}) != nil
	}, waitFor, 10*time.Millisecond)
	require.NoError(t, f.wl.Authorize(tunnel.Identity{Node: e.Name, Serial: "c", NotAfter: now.Add(48 * time.Hour)}))
}
