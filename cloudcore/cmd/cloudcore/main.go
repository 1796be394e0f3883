// Command cloudcore is Tether's cloud side: it accepts edge nodes over the
// tunnel. This file only reads its configuration (defaults, --config FILE,
// flags) and hands it to cloudcore/app.
package main

import (
	"context"
	"fmt"
	"log/slog"
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
	var configPath string
	fromFlags := config.Default()
	root := &cobra.Command{
		Use:   "cloudcore",
		Short: "Tether's cloud side: onboards whitelisted edge nodes and syncs their objects over QUIC and WebSocket",
		Long: "Tether's cloud side: onboards whitelisted edge nodes and syncs their objects over QUIC and WebSocket.\n" +
			"Settings come from the defaults, then --config FILE (cloudcore config default prints one), then the flags given.",
		SilenceUsage:  true,
		SilenceErrors: true,
		Args:          cobra.NoArgs,
	}
	flags, err := configfile.Bind(&fromFlags, root.Flags())
	if err != nil {
		// The configuration's type is wrong: a programming error.
		panic(err)
	}
	root.Flags().StringVar(&configPath, "config", "", "CloudCoreConfiguration file (YAML); flags given override it")
	flags.SetUsage(root)
	root.RunE = func(cmd *cobra.Command, _ []string) error {
		cfg, err := loadConfig(configPath, flags)
		if err != nil {
			return err
		}
		return run(cmd.Context(), cfg)
	}
	root.AddCommand(newAdminCommand(), newConfigCommand())
	return root
}

// loadConfig returns the defaults, overlaid with the file at path (if
// any), overlaid with the flags given, validated.
func loadConfig(path string, flags *configfile.Flags) (config.CloudCoreConfiguration, error) {
	cfg := config.Default()
	if path != "" {
		var err error
		if cfg, err = config.Load(path); err != nil {
			return cfg, err
		}
	}
	flags.Apply(&cfg)
	if err := cfg.Validate(); err != nil {
		return cfg, fmt.Errorf("invalid configuration:\n%w", err)
	}
	return cfg, nil
}

// newConfigCommand returns "cloudcore config": the config file's tools.
func newConfigCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "config", Short: "Print or check CloudCore's config file", Args: cobra.NoArgs}
	cmd.AddCommand(&cobra.Command{
		Use:   "default",
		Short: "Print the default configuration as a commented CloudCoreConfiguration file",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, err := cmd.OutOrStdout().Write(config.DefaultFile())
			return err
		},
	})
	return cmd
}

func serve(ctx context.Context, cfg config.CloudCoreConfiguration) error {
	level, err := configfile.ParseLevel(cfg.Ops.LogLevel)
	if err != nil {
		return err
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	restCfg, err := clientcmd.BuildConfigFromFlags("", cfg.Kubernetes.Kubeconfig)
	if err != nil {
		return fmt.Errorf("kubernetes client config: %w", err)
	}
	reg, err := tetherserve.NewRegistry()
	if err != nil {
		return err
	}
	a, err := app.New(ctx, appConfig(cfg, restCfg, logger, reg))
	if err != nil {
		return err
	}
	return a.Run(ctx)
}

// appConfig is where each setting of the file goes in CloudCore.
func appConfig(c config.CloudCoreConfiguration, kube *rest.Config, logger *slog.Logger, reg prometheus.Registerer) app.Config {
	return app.Config{
		Kubernetes:        kube,
		QUICAddr:          c.Tunnel.QUICAddr,
		WebSocketAddr:     c.Tunnel.WebSocketAddr,
		KeepAlive:         c.Tunnel.KeepAlive.Duration,
		DeadPeerTimeout:   c.Tunnel.DeadPeerTimeout.Duration,
		JoinAddr:          c.Onboarding.JoinAddr,
		ServerSANs:        c.Onboarding.ServerSANs,
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
	}
}
