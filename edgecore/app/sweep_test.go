package app_test

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/edgecore/app"
	"github.com/tetheredge/tether/edgecore/resources"
	"github.com/tetheredge/tether/edgecore/runtime/vm"
	"github.com/tetheredge/tether/edgecore/store"
)

// EdgeCore killed between the VM backend's Allocate and its VM record (the
// crash injected by doing the Allocate on EdgeCore's real store and pool
// and stopping there), and a pod deleted while it was down: started again,
// EdgeCore releases both grants (counted) and keeps those of a recorded
// VM and of a pod the store holds. Before the sweep, the orphans' cores
// stayed taken: the request for the free cores at the end failed.
func TestSweepAtStart(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cfg := config(t)
	rc := resources.Config{CPUs: "0-7", HugepageMounts: map[int64]string{}}
	cfg.Resources = &rc
	require.NoError(t, os.MkdirAll(cfg.DataDir, 0o700))
	st, err := store.Open(ctx, filepath.Join(cfg.DataDir, app.DBFile), nil)
	require.NoError(t, err)
	pool, err := resources.New(rc, st.Allocations(), nil)
	require.NoError(t, err)
	for _, owner := range []string{"sb-orphan", "sb-recorded", "pod/uid-live/c", "pod/uid-gone/c"} {
		_, err := pool.Allocate(ctx, resources.Request{Owner: owner, DedicatedCPUs: 2})
		require.NoError(t, err)
	}
	// sb-orphan's record was never written; sb-recorded's was.
	require.NoError(t, st.Allocations().Claim(ctx, "sb-recorded",
		[]store.Allocation{{Kind: vm.KindVM, Item: "sb-recorded", Detail: []byte(`{"id":"sb-recorded"}`)}}, nil))
	pod := &corev1.Pod{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{Name: "live", Namespace: "default", UID: "uid-live"},
	}
	data, err := json.Marshal(pod)
	require.NoError(t, err)
	require.NoError(t, st.Apply(ctx, []store.Change{{Op: message.OpUpsert, Object: store.Object{
		Resource: message.Resource{Version: "v1", Kind: "Pod", Namespace: "default", Name: "live", UID: "uid-live"},
		Version:  "1", Data: data,
	}}}))
	require.NoError(t, st.Close())

	reg := prometheus.NewRegistry()
	cfg.Registerer = reg
	a, err := app.New(ctx, cfg)
	require.NoError(t, err)
	defer func() { require.NoError(t, a.Close()) }()
	for owner, held := range map[string]bool{"sb-orphan": false, "pod/uid-gone/c": false, "sb-recorded": true, "pod/uid-live/c": true} {
		_, ok, err := a.Pool().Lookup(ctx, owner)
		require.NoError(t, err)
		require.Equal(t, held, ok, "grant of %s", owner)
	}
	n, err := testutil.GatherAndCount(reg, "tether_edge_resources_swept_total")
	require.NoError(t, err)
	require.Equal(t, 1, n)
	mfs, err := reg.Gather()
	require.NoError(t, err)
	for _, mf := range mfs {
		if mf.GetName() == "tether_edge_resources_swept_total" {
			require.InDelta(t, 2, mf.GetMetric()[0].GetCounter().GetValue(), 0)
		}
	}
	_, err = a.Pool().Allocate(ctx, resources.Request{Owner: "new", DedicatedCPUs: 4})
	require.NoError(t, err, "the orphans' cores are free")
}
