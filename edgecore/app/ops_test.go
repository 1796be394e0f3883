package app_test

import (
	"context"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	"k8s.io/klog/v2"

	"github.com/tetheredge/tether/edgecore/app"
	"github.com/tetheredge/tether/tests/containerd"
	"github.com/tetheredge/tether/tests/opsprobe"
)

// EdgeCore serves its registry on /metrics and is ready once its store
// answers and the runtime its pod manager drives (here the in-process
// shim in front of a real containerd) has answered; with containerd gone
// before the shim ever connected, /readyz says which check fails while
// /livez still passes. Goroutines are checked in TestMain.
func TestOpsEndpoint(t *testing.T) {
	h := containerd.Start(t)
	ctx, cancel := context.WithTimeout(klog.NewContext(context.Background(), logr.Discard()), 2*time.Minute)
	defer cancel()
	newApp := func() *app.App {
		cfg := config(t)
		cfg.CRI = app.CRIConfig{Listen: filepath.Join(t.TempDir(), "cri.sock"), Containerd: h.Endpoint()}
		cfg.Registerer = prometheus.NewRegistry()
		cfg.MetricsAddr = "127.0.0.1:0"
		a, err := app.New(ctx, cfg)
		require.NoError(t, err)
		return a
	}
	good, cut := newApp(), newApp()
	// cut's listener is closed by Close though Run never served it.
	defer func() { require.NoError(t, cut.Close()) }()
	defer func() { require.NoError(t, good.Close()) }()

	stop := run(ctx, t, good)
	base := "http://" + good.MetricsAddr().String()
	code, body, err := opsprobe.Get(base + "/metrics")
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, code)
	require.Contains(t, body, "tether_edge_events_applied_total 0")
	require.Eventually(t, func() bool {
		code, body, err := opsprobe.Get(base + "/readyz?verbose")
		return err == nil && code == http.StatusOK &&
			body == "[+]store ok\n[+]container-runtime ok\nreadyz check passed\n"
	}, time.Minute, 50*time.Millisecond)
	stop()
	_, _, err = opsprobe.Get(base + "/livez")
	require.Error(t, err, "the endpoint is closed after Run")

	require.NoError(t, h.Stop())
	defer run(ctx, t, cut)()
	base = "http://" + cut.MetricsAddr().String()
	code, body, err = opsprobe.Get(base + "/readyz")
	require.NoError(t, err)
	require.Equal(t, http.StatusInternalServerError, code)
	require.Contains(t, body, "[+]store ok\n")
	require.Contains(t, body, "[-]container-runtime failed: the container runtime has not answered yet")
	code, body, err = opsprobe.Get(base + "/livez")
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, code)
	require.Equal(t, "ok", body)
}

// A bad address is refused by New, naming it.
func TestOpsEndpointBadAddress(t *testing.T) {
	cfg := config(t)
	cfg.MetricsAddr = "127.0.0.1"
	_, err := app.New(t.Context(), cfg)
	require.ErrorContains(t, err, `parse address "127.0.0.1"`)
}
