package e2e

import (
	"context"
	"net/http"
	"net/url"
	"regexp"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"k8s.io/client-go/rest"

	cloudapp "github.com/tetheredge/tether/cloudcore/app"
	"github.com/tetheredge/tether/tests/netproxy"
	"github.com/tetheredge/tether/tests/opsprobe"
	"github.com/tetheredge/tether/tests/promtest"
	"github.com/tetheredge/tether/tests/testlog"
)

// TestCloudOpsEndpoint: CloudCore's /readyz fails, naming its checks,
// while its informers cannot list (the path to the real API server is cut
// by a proxy after New), and passes once they synced and the tunnel and
// join listeners are up; /livez passes throughout, /metrics serves the
// daemon's registry, and the endpoint is gone after Run.
func TestCloudOpsEndpoint(t *testing.T) {
	env := cp.Env(t)
	api, err := url.Parse(env.Config.Host)
	require.NoError(t, err)
	px := netproxy.Start(t, api.Host, netproxy.Options{Network: "tcp"})
	kcfg := rest.CopyConfig(env.Config)
	kcfg.Host = "https://" + px.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	a, err := cloudapp.New(ctx, cloudapp.Config{
		Kubernetes: kcfg, QUICAddr: "127.0.0.1:0", JoinAddr: "127.0.0.1:0", ServerSANs: []string{"127.0.0.1"},
		Logger: testlog.New(), Registerer: promtest.NewRegistry(), MetricsAddr: "127.0.0.1:0",
		VMs: cloudapp.VMConfig{Disabled: true},
	})
	require.NoError(t, err)
	px.Partition(true)
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	base := "http://" + a.MetricsAddr().String()

	code, body, err := opsprobe.Get(base + "/readyz")
	require.NoError(t, err)
	require.Equal(t, http.StatusInternalServerError, code, body)
	require.Contains(t, body, "[-]informers-synced failed")
	require.Contains(t, body, "[-]listeners failed: the tunnel is not listening")
	code, body, err = opsprobe.Get(base + "/livez")
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, code)
	require.Equal(t, "ok", body)
	code, body, err = opsprobe.Get(base + "/metrics")
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, code)
	require.Regexp(t, regexp.MustCompile(`(?m)^tether_autonomy_offline_nodes 0$`), body)

	px.Partition(false)
	require.Eventually(t, func() bool {
		code, body, err := opsprobe.Get(base + "/readyz?verbose")
		return err == nil && code == http.StatusOK && body == "[+]informers-synced ok\n[+]listeners ok\nreadyz check passed\n"
	}, 2*time.Minute, 50*time.Millisecond)
	require.NotNil(t, a.QUICAddr())

	cancel()
	require.NoError(t, <-done)
	_, _, err = opsprobe.Get(base + "/livez")
	require.Error(t, err, "the endpoint is closed after Run")
}
