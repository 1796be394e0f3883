package upstream

import (
	"context"
	"log/slog"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	"k8s.io/client-go/kubernetes"

	"github.com/tetheredge/tether/cloudcore/catalog"
	"github.com/tetheredge/tether/cloudcore/dispatch"
	"github.com/tetheredge/tether/common/message"
)

// TestRefusalsLoggedOncePerCause: every refusal is counted, but a node
// repeating one is logged once per interval; another node or another
// reason is logged on its own.
func TestRefusalsLoggedOncePerCause(t *testing.T) {
	f := newFixture(t, nil, Config{})
	ctx := context.Background()
	forged := &message.Message{Kind: message.KindUpstream, Op: message.OpUpsert,
		Resource: message.Resource{Version: "v1", Kind: "Secret", Namespace: "kube-system", Name: "x"}}
	for range 5 {
		require.ErrorIs(t, f.w.Apply(ctx, "edge-a", forged), dispatch.ErrForbidden)
	}
	require.ErrorIs(t, f.w.Apply(ctx, "edge-b", forged), dispatch.ErrForbidden)
	bad := &message.Message{Kind: message.KindUpstream, Op: message.OpUpsert,
		Resource: message.Resource{Version: "v1", Kind: "Node", Name: "edge-a"}, Payload: []byte("{")}
	require.ErrorIs(t, f.w.Apply(ctx, "edge-a", bad), dispatch.ErrForbidden)

	require.Equal(t, 6.0, f.refused(t, reasonNotOwn))
	require.Equal(t, 1.0, f.refused(t, reasonBadPayload))
	require.Equal(t, 3, f.logs.count("upstream write refused"), "one line per node and reason")
}

// TestNewDefaults: a nil logger discards (nothing reaches slog.Default),
// and a metrics registration error is returned.
func TestNewDefaults(t *testing.T) {
	logs := &logBuffer{}
	prev := slog.Default()
	slog.SetDefault(slog.New(slog.NewTextHandler(logs, nil)))
	t.Cleanup(func() { slog.SetDefault(prev) })

	client, err := kubernetes.NewForConfig(cp.Env(t).Config)
	require.NoError(t, err)
	reg := prometheus.NewRegistry()
	w, err := New(client, staleBinding{}, Config{EdgeLabel: catalog.DefaultEdgeLabel, Registerer: reg})
	require.NoError(t, err)
	err = w.Apply(context.Background(), "edge-a", &message.Message{Kind: message.KindUpstream, Op: message.OpUpsert,
		Resource: message.Resource{Version: "v1", Kind: "Secret", Namespace: "kube-system", Name: "x"}})
	require.ErrorIs(t, err, dispatch.ErrForbidden)
	require.Zero(t, logs.count("refused"), "a nil logger must not fall back to slog.Default")

	_, err = New(client, staleBinding{}, Config{EdgeLabel: catalog.DefaultEdgeLabel, Registerer: reg})
	require.Error(t, err, "registering the metrics twice fails, and New says so")

	_, err = New(client, staleBinding{}, Config{})
	require.Error(t, err, "EdgeLabel is required")
	_, err = New(client, nil, Config{EdgeLabel: catalog.DefaultEdgeLabel})
	require.Error(t, err, "a Binding is required")
}
