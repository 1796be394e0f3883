// Command cloudcore is Tether's cloud side: it accepts edge nodes over the
// tunnel. This file only parses flags and wires components together.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/tetheredge/tether/cloudcore/app"
	"github.com/tetheredge/tether/cloudcore/catalog"
	"github.com/tetheredge/tether/cloudcore/onboard"
	tetherserve "github.com/tetheredge/tether/common/serve"
)

func main() {
	if err := newRootCommand().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "cloudcore:", err)
		os.Exit(1)
	}
}

type serveFlags struct {
	quicAddr, wsAddr, joinAddr  string
	serverSANs                  []string
	certValidity                time.Duration
	caNamespace, caName         string
	keepAlive, dead             time.Duration
	logLevel                    string
	kubeconfig                  string
	edgeLabel                   string
	kubeQPS                     float32
	kubeBurst                   int
	registerTaintKeys           []string
	offlineAutonomy             time.Duration
	vmController, vmLeaderElect bool
	metricsAddr                 string
	rebalance                   bool
	advertiseAddr               string
	rebalancePeriod             time.Duration
}

func newRootCommand() *cobra.Command {
	var f serveFlags
	root := &cobra.Command{
		Use:           "cloudcore",
		Short:         "Tether's cloud side: onboards whitelisted edge nodes and syncs their objects over QUIC and WebSocket",
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return serve(cmd.Context(), f)
		},
	}
	host, _ := os.Hostname()
	fl := root.Flags()
	fl.StringVar(&f.quicAddr, "quic-addr", ":10000", "UDP address for the QUIC tunnel (empty disables)")
	fl.StringVar(&f.wsAddr, "websocket-addr", ":10000", "TCP address for the WebSocket-over-TLS tunnel (empty disables)")
	fl.StringVar(&f.joinAddr, "join-addr", onboard.DefaultAddr, "TCP address of the HTTPS join endpoint")
	fl.StringSliceVar(&f.serverSANs, "server-san", []string{host, "localhost", "127.0.0.1"}, "DNS names and IPs edges use to reach CloudCore (load balancer addresses too)")
	fl.DurationVar(&f.certValidity, "cert-validity", onboard.DefaultValidity, "validity of node certificates (renewed at 80%)")
	fl.StringVar(&f.caNamespace, "ca-namespace", onboard.DefaultCANamespace, "namespace of the cluster CA Secret")
	fl.StringVar(&f.caName, "ca-secret", onboard.DefaultCAName, "name of the cluster CA Secret (created if absent)")
	fl.DurationVar(&f.keepAlive, "keepalive", 5*time.Second, "keepalive interval")
	fl.DurationVar(&f.dead, "dead-peer-timeout", 15*time.Second, "silence after which an edge is declared gone")
	fl.StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
	fl.StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig of the cluster (empty: in-cluster config)")
	fl.StringVar(&f.edgeLabel, "edge-label", catalog.DefaultEdgeLabel, "label that marks a Node as an edge node")
	fl.Float32Var(&f.kubeQPS, "kube-api-qps", app.DefaultQPS, "API requests per second of each Kubernetes client (one writes edges' leases and status, one the rest)")
	fl.IntVar(&f.kubeBurst, "kube-api-burst", app.DefaultBurst, "API request burst of each Kubernetes client")
	fl.StringSliceVar(&f.registerTaintKeys, "edge-register-taint-keys", nil, "taint keys an edge may put on its own Node when it registers (default none)")
	fl.DurationVar(&f.offlineAutonomy, "offline-autonomy", 24*time.Hour, "how long CloudCore keeps renewing the lease of a trusted edge node that lost its session, so it stays Ready and its pods are not evicted (0 disables)")
	fl.BoolVar(&f.vmController, "vm-controller", true, "run the VirtualMachine controller (VMs -> pods with runtimeClassName tether-vm; needs the CRD and RuntimeClass from build/)")
	fl.BoolVar(&f.vmLeaderElect, "vm-leader-elect", true, "run the VirtualMachine controller only while holding the Lease tether-vm-controller in the CA namespace, so several CloudCore replicas can run (false: only with one replica)")
	fl.StringVar(&f.metricsAddr, "metrics-addr", app.DefaultMetricsAddr, "TCP address of /metrics, /healthz, /livez and /readyz (\"\" or 0 disables; local only by default)")
	fl.BoolVar(&f.rebalance, "rebalance", true, "publish this replica's session count in a Lease in the CA namespace and move edges to less loaded replicas (docs/protocol.md, Rebalancing)")
	fl.StringVar(&f.advertiseAddr, "advertise-addr", "", "address edges reach this replica by (as in edgecore --cloud), the hint other replicas give edges they move here (empty: none; moved edges go on with their own list)")
	fl.DurationVar(&f.rebalancePeriod, "rebalance-period", 10*time.Second, "how often the session count is published and rebalancing decided")
	root.AddCommand(newAdminCommand())
	return root
}

func newLogger(level string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log level %q: %w", level, err)
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: l})), nil
}

func serve(ctx context.Context, f serveFlags) error {
	logger, err := newLogger(f.logLevel)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	restCfg, err := clientcmd.BuildConfigFromFlags("", f.kubeconfig)
	if err != nil {
		return fmt.Errorf("kubernetes client config: %w", err)
	}
	reg, err := tetherserve.NewRegistry()
	if err != nil {
		return err
	}
	a, err := app.New(ctx, app.Config{
		Kubernetes:        restCfg,
		QUICAddr:          f.quicAddr,
		WebSocketAddr:     f.wsAddr,
		JoinAddr:          f.joinAddr,
		ServerSANs:        f.serverSANs,
		CertValidity:      f.certValidity,
		CANamespace:       f.caNamespace,
		CAName:            f.caName,
		KeepAlive:         f.keepAlive,
		DeadPeerTimeout:   f.dead,
		EdgeLabel:         f.edgeLabel,
		QPS:               f.kubeQPS,
		Burst:             f.kubeBurst,
		RegisterTaintKeys: f.registerTaintKeys,
		OfflineAutonomy:   f.offlineAutonomy,
		VMs:               app.VMConfig{Disabled: !f.vmController, NoLeaderElection: !f.vmLeaderElect},
		Logger:            logger,
		Registerer:        reg,
		MetricsAddr:       f.metricsAddr,
		Rebalance:         app.RebalanceConfig{Enabled: f.rebalance, Address: f.advertiseAddr, Period: f.rebalancePeriod},
	})
	if err != nil {
		return err
	}
	return a.Run(ctx)
}
