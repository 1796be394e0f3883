package hollow_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/tests/hollow"
	"github.com/tetheredge/tether/tests/testlog"
	"github.com/tetheredge/tether/tunnel"
)

// Edges spread over child `hollowedge run` processes report as one fleet:
// the counts, the objects held and the fan-out of every child add up, and
// a child that dies fails the next report with its log named.
func TestProcs(t *testing.T) {
	env := cp.Env(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	dir := t.TempDir()
	kubeconfig := filepath.Join(dir, "kubeconfig")
	require.NoError(t, os.WriteFile(kubeconfig, env.KubeConfig, 0o600))
	bin, err := hollow.BuildCloudCore(ctx, dir)
	require.NoError(t, err)
	hollowedge := filepath.Join(dir, "hollowedge")
	out, err := exec.CommandContext(ctx, "go", "build", "-o", hollowedge, "github.com/tetheredge/tether/tests/cmd/hollowedge").CombinedOutput()
	require.NoError(t, err, "%s", out)
	cc, err := hollow.StartCloudCore(ctx, hollow.CloudCoreConfig{Binary: bin, KubeConfig: kubeconfig, Dir: dir})
	require.NoError(t, err)
	t.Cleanup(cc.Stop)

	const edges, perProcess = 6, 2
	nodes := make([]string, edges)
	for i := range nodes {
		nodes[i] = fmt.Sprintf("hollow-procs-%02d", i)
	}
	ids, ca, err := hollow.Onboard(ctx, env.Config, nodes, hollow.OnboardConfig{Logger: testlog.New()})
	require.NoError(t, err)
	w := hollow.Workload{Namespace: env.Namespace(t), PodsPerEdge: 1}
	require.NoError(t, w.Create(ctx, env.Config, nodes))

	procs, err := hollow.StartProcs(ctx, hollow.ProcsConfig{
		Binary: hollowedge, Dir: t.TempDir(), Cloud: []string{cc.Addr()}, CA: ca, PerProcess: perProcess,
		Namespace: w.Namespace, Backoff: tunnel.Backoff{Min: 100 * time.Millisecond, Max: time.Second}, Logger: testlog.New(),
	}, ids)
	require.NoError(t, err)
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			_ = procs.Stop()
		}
	})
	require.Equal(t, edges/perProcess, procs.Processes())
	// A reconcile's end says the cloud queued every difference: the
	// stores hold them a little later.
	require.Eventually(t, func() bool {
		r, err := procs.Report(ctx, hollow.Query{Objects: true})
		require.NoError(t, err)
		return r.Reconciled == edges && r.Objects == edges*w.PerEdge()
	}, 2*time.Minute, 100*time.Millisecond)
	rep, err := procs.Report(ctx, hollow.Query{Objects: true, Connect: true, Self: true})
	require.NoError(t, err)
	require.Equal(t, hollow.Snapshot{Started: edges, Connected: edges, Reconciled: edges, Objects: edges * w.PerEdge()}, rep.Snapshot)
	require.Equal(t, edges/perProcess, rep.Processes)
	require.Len(t, rep.Connect, edges)
	require.Len(t, rep.FirstReconcile, edges)
	require.Positive(t, rep.RSS)
	require.Positive(t, rep.CPU)
	require.Greater(t, rep.FDs, rep.MaxFDs, "the open files of several processes add up")

	changed, err := w.Bump(ctx, env.Config, 1)
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		r, err := procs.Report(ctx, hollow.Query{WatchedSince: changed})
		require.NoError(t, err)
		return r.WatchedMissing == 0 && len(r.Watched) == edges
	}, 2*time.Minute, 100*time.Millisecond, "the change did not reach every child's stores")

	// One child dies: the reports fail and name it, and so does Stop.
	require.NoError(t, syscall.Kill(procs.Pids()[1], syscall.SIGKILL))
	// (Until its exit is reaped, the report fails with the closed socket.)
	require.Eventually(t, func() bool {
		_, err := procs.Report(ctx, hollow.Query{})
		return err != nil && strings.Contains(err.Error(), "hollow child 1 exited")
	}, time.Minute, 100*time.Millisecond)
	stopped = true
	err = procs.Stop()
	require.ErrorContains(t, err, "hollow child 1: signal: killed")
	require.NotContains(t, err.Error(), "hollow child 0", "the others end cleanly on SIGTERM")
	require.NotContains(t, err.Error(), "hollow child 2")
}

// A child that cannot fit its edges under its open file limit refuses
// them with a clear error instead of failing later.
func TestRaiseFileLimit(t *testing.T) {
	limit, err := hollow.RaiseFileLimit(10)
	require.NoError(t, err)
	_, err = hollow.RaiseFileLimit(int(limit))
	require.ErrorContains(t, err, "spread them over several processes")
}
