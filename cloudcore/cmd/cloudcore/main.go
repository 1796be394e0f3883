// Command cloudcore is Tether's cloud side: it accepts edge nodes over the
// tunnel. This file only parses flags and wires components together.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/tetheredge/tether/cloudcore/catalog"
	"github.com/tetheredge/tether/cloudcore/dispatch"
	"github.com/tetheredge/tether/cloudcore/hub"
	"github.com/tetheredge/tether/cloudcore/upstream"
	"github.com/tetheredge/tether/common/pki"
	"github.com/tetheredge/tether/tunnel"
)

func main() {
	if err := newRootCommand().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "cloudcore:", err)
		os.Exit(1)
	}
}

type serveFlags struct {
	quicAddr, wsAddr string
	cert, key, ca    string
	keepAlive, dead  time.Duration
	logLevel         string
	kubeconfig       string
	edgeLabel        string
}

func newRootCommand() *cobra.Command {
	var f serveFlags
	root := &cobra.Command{
		Use:           "cloudcore",
		Short:         "Tether's cloud side: accepts edge nodes over QUIC and WebSocket",
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return serve(cmd.Context(), f)
		},
	}
	fl := root.Flags()
	fl.StringVar(&f.quicAddr, "quic-addr", ":10000", "UDP address for QUIC (empty disables)")
	fl.StringVar(&f.wsAddr, "websocket-addr", ":10000", "TCP address for WebSocket over TLS (empty disables)")
	fl.StringVar(&f.cert, "tls-cert", "", "server certificate (PEM)")
	fl.StringVar(&f.key, "tls-key", "", "server private key (PEM)")
	fl.StringVar(&f.ca, "client-ca", "", "CA bundle that edge certificates must chain to (PEM)")
	fl.DurationVar(&f.keepAlive, "keepalive", 5*time.Second, "keepalive interval")
	fl.DurationVar(&f.dead, "dead-peer-timeout", 15*time.Second, "silence after which an edge is declared gone")
	fl.StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
	fl.StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig of the cluster (empty: in-cluster config)")
	fl.StringVar(&f.edgeLabel, "edge-label", catalog.DefaultEdgeLabel, "label that marks a Node as an edge node")
	root.AddCommand(newDevPKICommand())
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
	if f.cert == "" || f.key == "" || f.ca == "" {
		return errors.New("--tls-cert, --tls-key and --client-ca are required (for a local try: cloudcore dev-pki)")
	}
	pair, err := tls.LoadX509KeyPair(f.cert, f.key)
	if err != nil {
		return fmt.Errorf("load server certificate: %w", err)
	}
	pool, err := pki.LoadPool(f.ca)
	if err != nil {
		return err
	}
	restCfg, err := clientcmd.BuildConfigFromFlags("", f.kubeconfig)
	if err != nil {
		return fmt.Errorf("kubernetes client config: %w", err)
	}
	client, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	reg := prometheus.NewRegistry()
	cat, err := catalog.New(client, catalog.Config{EdgeLabel: f.edgeLabel, Logger: logger})
	if err != nil {
		return err
	}
	up, err := upstream.New(client, cat, upstream.Config{EdgeLabel: f.edgeLabel, Logger: logger})
	if err != nil {
		return err
	}
	disp := dispatch.New(dispatch.Deps{Catalog: cat, Upstream: up}, dispatch.Config{}, logger, reg)
	cat.Subscribe(disp.Notify)
	srv, err := tunnel.NewServer(tunnel.ServerConfig{
		Options:       tunnel.Options{KeepAlive: f.keepAlive, DeadPeerTimeout: f.dead, Logger: logger, Registerer: reg},
		QUICAddr:      f.quicAddr,
		WebSocketAddr: f.wsAddr,
		TLS:           &tls.Config{Certificates: []tls.Certificate{pair}, ClientCAs: pool, MinVersion: tls.VersionTLS13},
		Handler:       hub.New(disp, nil, logger),
	})
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return cat.Run(ctx) })
	g.Go(func() error {
		// Serving before the cache is complete would tell edges to prune
		// objects the cloud has simply not seen yet.
		if err := cat.WaitForSync(ctx); err != nil {
			return err
		}
		return srv.Run(ctx)
	})
	return g.Wait()
}

// newDevPKICommand writes a throwaway CA, a server certificate and node
// certificates for trying Tether on one machine. Real clusters onboard
// nodes through the whitelist and join tokens instead.
func newDevPKICommand() *cobra.Command {
	var dir string
	var hosts, nodes []string
	cmd := &cobra.Command{
		Use:   "dev-pki",
		Short: "Write a development CA, server and node certificates (not for production)",
		RunE: func(_ *cobra.Command, _ []string) error {
			ca, err := pki.NewCA("tether-dev-ca", 365*24*time.Hour)
			if err != nil {
				return err
			}
			if err := pki.WriteFiles(filepath.Join(dir, "ca.crt"), ca.Cert, filepath.Join(dir, "ca.key"), ca.Key); err != nil {
				return err
			}
			cert, key, err := ca.Issue(pki.LeafRequest{CommonName: "cloudcore", Usage: pki.UsageServer, Hosts: hosts, Validity: 365 * 24 * time.Hour})
			if err != nil {
				return err
			}
			if err := pki.WriteFiles(filepath.Join(dir, "server.crt"), cert, filepath.Join(dir, "server.key"), key); err != nil {
				return err
			}
			for _, n := range nodes {
				cert, key, err := ca.Issue(pki.LeafRequest{CommonName: n, Usage: pki.UsageClient, Validity: 30 * 24 * time.Hour})
				if err != nil {
					return err
				}
				if err := pki.WriteFiles(filepath.Join(dir, n+".crt"), cert, filepath.Join(dir, n+".key"), key); err != nil {
					return err
				}
			}
			fmt.Printf("wrote ca.crt, server.crt and %d node certificate(s) to %s\n", len(nodes), dir)
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "_output/dev-pki", "directory to write into")
	cmd.Flags().StringSliceVar(&hosts, "host", []string{"127.0.0.1", "localhost"}, "server certificate SANs")
	cmd.Flags().StringSliceVar(&nodes, "node", []string{"edge-1"}, "node names to issue client certificates for")
	return cmd
}
