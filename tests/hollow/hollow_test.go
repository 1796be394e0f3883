package hollow_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/tests/controlplane"
	"github.com/tetheredge/tether/tests/hollow"
	"github.com/tetheredge/tether/tests/testlog"
	"github.com/tetheredge/tether/tunnel"
)

var cp controlplane.Shared

func TestMain(m *testing.M) { os.Exit(cp.RunChecked(m)) }

// smokeEdges is how many hollow edges the smoke test runs: enough that
// the fleet's fan-out and reconnects are exercised, few enough for make
// test under the race detector.
const smokeEdges = 40

// The simulator works end to end against the shipped cloudcore command
// and a real API server: every hollow edge connects and holds exactly its
// Node, its pods and the shared ConfigMap; a change of the ConfigMap
// reaches every store; and after CloudCore is SIGKILLed, the ConfigMap
// changed while it is down and it is started again, every edge opens a
// new session, finishes a reconcile and holds the new generation.
func TestSmoke(t *testing.T) {
	env := cp.Env(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	dir := t.TempDir()
	kubeconfig := filepath.Join(dir, "kubeconfig")
	require.NoError(t, os.WriteFile(kubeconfig, env.KubeConfig, 0o600))
	bin, err := hollow.BuildCloudCore(ctx, dir)
	require.NoError(t, err)
	cc, err := hollow.StartCloudCore(ctx, hollow.CloudCoreConfig{
		Binary: bin, KubeConfig: kubeconfig, Dir: dir,
		Args: []string{"--keepalive", "200ms", "--dead-peer-timeout", "2s"},
	})
	require.NoError(t, err)
	t.Cleanup(cc.Stop)

	nodes := make([]string, smokeEdges)
	for i := range nodes {
		nodes[i] = fmt.Sprintf("hollow-smoke-%02d", i)
	}
	ids, ca, err := hollow.Onboard(ctx, env.Config, nodes, hollow.OnboardConfig{Logger: testlog.New()})
	require.NoError(t, err)
	w := hollow.Workload{Namespace: env.Namespace(t), PodsPerEdge: 2}
	require.NoError(t, w.Create(ctx, env.Config, nodes))

	fleet, err := hollow.New(hollow.Config{
		Cloud: []string{cc.Addr()}, CA: ca, DataRoot: t.TempDir(),
		LeaseDuration: 8 * time.Second, KeepAlive: 200 * time.Millisecond, DeadPeerTimeout: 2 * time.Second,
		Backoff: tunnel.Backoff{Min: 100 * time.Millisecond, Max: time.Second},
		Watch:   w.Key(), Logger: testlog.New(),
	}, ids)
	require.NoError(t, err)
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- fleet.Run(runCtx) }()
	defer func() {
		stop()
		require.NoError(t, <-done)
	}()

	// holdAll waits until every edge holds what it must at generation.
	holdAll := func(generation int, what string) {
		t.Helper()
		var last atomic.Pointer[error]
		ok := assert.Eventually(t, func() bool {
			for _, e := range fleet.Edges() {
				st := e.State()
				err := fmt.Errorf("%s has not started", st.Node)
				if st.Store != nil {
					err = w.Check(ctx, st.Store, st.Node, generation)
				}
				if err != nil {
					last.Store(&err)
					return false
				}
			}
			return true
		}, 2*time.Minute, 100*time.Millisecond)
		if !ok {
			t.Fatalf("%s: %v", what, *last.Load())
		}
	}
	holdAll(0, "after the first connect")
	snap, err := fleet.Snapshot(ctx)
	require.NoError(t, err)
	require.Equal(t, hollow.Snapshot{Started: smokeEdges, Connected: smokeEdges, Reconciled: smokeEdges, Objects: smokeEdges * w.PerEdge()}, snap)
	connect, _ := fleet.ConnectLatencies()
	require.Len(t, connect, smokeEdges)

	changed, err := w.Bump(ctx, env.Config, 1)
	require.NoError(t, err)
	holdAll(1, "after the ConfigMap changed")
	fanout, missing := fleet.WatchedSince(changed.Add(-time.Second))
	require.Zero(t, missing)
	require.Len(t, fanout, smokeEdges)

	killed := time.Now()
	cc.Kill()
	_, err = w.Bump(ctx, env.Config, 2)
	require.NoError(t, err)
	require.NoError(t, cc.Start(ctx))
	holdAll(2, "after CloudCore restarted")
	require.Eventually(t, func() bool {
		_, missing := fleet.ReconciledSince(killed)
		return missing == 0
	}, 2*time.Minute, 100*time.Millisecond, "not every edge reconciled again after the restart")
	for _, e := range fleet.Edges() {
		require.GreaterOrEqual(t, e.State().Sessions, 2, "%s did not open a new session", e.Node())
	}
}
