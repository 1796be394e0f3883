// Command cloudcore is Tether's cloud side: it accepts edge nodes over the
// tunnel. This file only reads its configuration (defaults, --config FILE,
// flags) and hands it to cloudcore/app.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/tetheredge/tether/cloudcore/app"
	"github.com/tetheredge/tether/cloudcore/config"
	"github.com/tetheredge/tether/common/configfile"
	"github.com/tetheredge/tether/common/logging"
	tetherserve "github.com/tetheredge/tether/common/serve"
)

func main() {
	if err := newRootCommand().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "cloudcore:", err)
		os.Exit(1)
	}
}

func newRootCommand() *cobra.Command { return newCommand(serve) }

// newCommand is the cloudcore command; run is what it does with the
// configuration (tests look at it instead).
func newCommand(run func(context.Context, config.CloudCoreConfiguration) error) *cobra.Command {
	root := &cobra.Command{
		Use:   "cloudcore",
		Short: "Tether's cloud side: onboards whitelisted edge nodes and syncs their objects over QUIC and WebSocket",
		Long: "Tether's cloud side: onboards whitelisted edge nodes and syncs their objects over QUIC and WebSocket.\n" +
			"Settings come from the defaults, then --config FILE (cloudcore config default prints one), then the flags given.",
		SilenceUsage:  true,
		SilenceErrors: true,
		Args:          cobra.NoArgs,
	}
	err := configfile.Command(root, configfile.Daemon[config.CloudCoreConfiguration]{
		Kind: config.Kind, Defaults: config.Default, DefaultFile: config.DefaultFile,
		Validate: config.CloudCoreConfiguration.Validate,
	}, run)
	if err != nil {
		// The configuration's type is wrong: a programming error.
		panic(err)
	}
	root.AddCommand(newAdminCommand())
	return root
}

func serve(ctx context.Context, cfg config.CloudCoreConfiguration) error {
	level, err := configfile.ParseLevel(cfg.Ops.LogLevel)
	if err != nil {
		return err
	}
	logger := logging.New(os.Stderr, level)
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	restCfg, err := kubeConfig(cfg.Kubernetes.Kubeconfig)
	if err != nil {
		return fmt.Errorf("kubernetes client config: %w", err)
	}
	reg, err := tetherserve.NewRegistry()
	if err != nil {
		return err
	}
	appCfg := appConfig(cfg, restCfg, logger, reg)
	a, err := app.New(ctx, appCfg)
	if err != nil {
		return err
	}
	if err := a.Listen(); err != nil {
		return err
	}
	// Where it can be reached, as bound (a port 0 chosen), and under
	// which names: what an operator checks first when edges do not
	// connect.
	logger.Info("cloudcore listening", "quic_addr", addrString(a.QUICAddr()), "websocket_addr", addrString(a.WebSocketAddr()),
		"join_addr", addrString(a.JoinAddr()), "metrics_addr", addrString(a.MetricsAddr()), "server_sans", appCfg.ServerSANs)
	return a.Run(ctx)
}

// kubeConfig is the client configuration of the kubeconfig at path, or
// with none the in-cluster one (a pod's ServiceAccount). Outside a pod
// without a kubeconfig it says what to give, where client-go would fall
// back to an empty configuration and suggest KUBERNETES_MASTER.
func kubeConfig(path string) (*rest.Config, error) {
	if path != "" {
		return clientcmd.BuildConfigFromFlags("", path)
	}
	c, err := rest.InClusterConfig()
	if err != nil {
		return nil, fmt.Errorf("no kubeconfig given and not in a pod (%w): give --kubeconfig FILE (file: kubernetes.kubeconfig)", err)
	}
	return c, nil
}

// addrString is a bound address, or "off" for a listener not configured.
func addrString(a net.Addr) string {
	if a == nil {
		return "off"
	}
	return a.String()
}

// appConfig is where each setting of the file goes in CloudCore.
func appConfig(c config.CloudCoreConfiguration, kube *rest.Config, logger *slog.Logger, reg prometheus.Registerer) app.Config {
	return app.Config{
		Kubernetes:        kube,
		QUICAddr:          c.Tunnel.QUICAddr,
		WebSocketAddr:     c.Tunnel.WebSocketAddr,
		KeepAlive:         c.Tunnel.KeepAlive.Duration,
		DeadPeerTimeout:   c.Tunnel.DeadPeerTimeout.Duration,
		MaxHandshakes:     c.Tunnel.MaxHandshakes,
		JoinAddr:          c.Onboarding.JoinAddr,
		ServerSANs:        c.Onboarding.SANs(nil),
		CertValidity:      c.Onboarding.CertValidity.Duration,
		CANamespace:       c.Onboarding.CANamespace,
		CAName:            c.Onboarding.CASecret,
		QPS:               c.Kubernetes.QPS,
		Burst:             c.Kubernetes.Burst,
		EdgeLabel:         c.Edges.Label,
		RegisterTaintKeys: c.Edges.RegisterTaintKeys,
		OfflineAutonomy:   c.Edges.OfflineAutonomy.Duration,
		VMs:               app.VMConfig{Disabled: !c.VM.Controller, NoLeaderElection: !c.VM.LeaderElect},
		Logger:            logger,
		Registerer:        reg,
		MetricsAddr:       c.Ops.MetricsAddr,
		Pprof:             c.Ops.Pprof,
		Rebalance:         app.RebalanceConfig{Enabled: c.Replicas.Rebalance, Address: c.Replicas.AdvertiseAddr, Period: c.Replicas.RebalancePeriod.Duration},
	}
}
