// Command edgecore is Tether's edge side: it keeps a session to the cloud.
// This file only parses flags and wires components together.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/tetheredge/tether/common/serve"
	"github.com/tetheredge/tether/edgecore/app"
	edgejoin "github.com/tetheredge/tether/edgecore/join"
	"github.com/tetheredge/tether/edgecore/nodestatus"
)

func main() {
	if err := newRootCommand().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "edgecore:", err)
		os.Exit(1)
	}
}

type flags struct {
	cloud           []string
	node            string
	cert, key, ca   string
	keepAlive, dead time.Duration
	logLevel        string
	dataDir         string
	runtime         string
	criListen       string
	containerd      string
	metricsAddr     string
	vm              vmFlags
	pool            poolFlags
}

func newRootCommand() *cobra.Command {
	var f flags
	root := &cobra.Command{
		Use:           "edgecore",
		Short:         "Tether's edge side: stays connected to CloudCore",
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return run(cmd.Context(), f)
		},
	}
	fl := root.Flags()
	fl.StringSliceVar(&f.cloud, "cloud", nil, "cloud addresses, tried in order: host:port (QUIC, then WebSocket), quic://host:port or wss://host:port")
	fl.StringVar(&f.node, "node", "", "this node's name (must match the certificate)")
	fl.StringVar(&f.cert, "tls-cert", "", "node certificate (PEM), never rewritten: renewals are stored in --data-dir and loaded instead once newer; default: the identity edgecore join stored in --data-dir")
	fl.StringVar(&f.key, "tls-key", "", "node private key (PEM); default: from --data-dir")
	fl.StringVar(&f.ca, "ca", "", "cluster CA (PEM); default: from --data-dir")
	fl.DurationVar(&f.keepAlive, "keepalive", 5*time.Second, "keepalive interval")
	fl.DurationVar(&f.dead, "dead-peer-timeout", 15*time.Second, "silence after which the cloud is declared gone")
	fl.StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
	fl.StringVar(&f.runtime, "container-runtime-endpoint", "", "CRI endpoint the pod manager drives, such as unix:///run/containerd/containerd.sock; empty with --cri-listen: the in-process CRI shim; empty without: EdgeCore runs no pods and its Node stays NotReady (ContainerRuntimeUnreachable)")
	fl.StringVar(&f.criListen, "cri-listen", "", "serve EdgeCore's CRI shim on this unix socket, in front of --containerd (empty: no shim)")
	fl.StringVar(&f.containerd, "containerd", app.DefaultContainerd, "containerd's CRI endpoint, behind the shim")
	fl.StringVar(&f.dataDir, "data-dir", "/var/lib/tether/edgecore", "directory of the node's state: SQLite store and its identity (node.pem: key and certificate, ca.crt), from edgecore join or renewals")
	fl.StringVar(&f.metricsAddr, "metrics-addr", app.DefaultMetricsAddr, "TCP address of /metrics, /healthz, /livez and /readyz (\"\" or 0 disables; local only by default)")
	addVMFlags(fl, &f.vm)
	addPoolFlags(fl, &f.pool)
	root.AddCommand(newJoinCommand(), newCRICommand(), newVMImageCommand())
	return root
}

func run(ctx context.Context, f flags) error {
	var level slog.Level
	if err := level.UnmarshalText([]byte(f.logLevel)); err != nil {
		return fmt.Errorf("log level %q: %w", f.logLevel, err)
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	if len(f.cloud) == 0 || f.node == "" {
		return errors.New("--cloud and --node are required")
	}
	cfg, err := appConfig(f, logger)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	a, err := app.New(ctx, cfg)
	if err != nil {
		return err
	}
	defer a.Close()
	return a.Run(ctx)
}

// appConfig is EdgeCore's configuration from the flags, with the node's
// identity loaded.
func appConfig(f flags, logger *slog.Logger) (app.Config, error) {
	pair, _, leaf, err := loadIdentity(f, logger)
	if err != nil {
		return app.Config{}, err
	}
	if err := edgejoin.CheckUsable(leaf, time.Now()); err != nil {
		return app.Config{}, err
	}
	pair.Leaf = leaf
	pool, err := f.pool.config()
	if err != nil {
		return app.Config{}, err
	}
	caCert, err := caOf(f)
	if err != nil {
		return app.Config{}, err
	}
	reg, err := serve.NewRegistry()
	if err != nil {
		return app.Config{}, err
	}
	// Renewals are stored in --data-dir, also with --tls-cert: the files
	// named by flags are the operator's.
	return app.Config{
		Cloud: f.cloud, Node: f.node, Certificate: pair, CA: caCert, IdentityDir: f.dataDir, DataDir: f.dataDir,
		KeepAlive: f.keepAlive, DeadPeerTimeout: f.dead, Logger: logger, Registerer: reg, MetricsAddr: f.metricsAddr,
		// The node is Ready only when its container runtime answers; with
		// none it is NotReady, ContainerRuntimeUnreachable: nothing can
		// run on it.
		CRIEndpoint: f.runtime,
		CRI:         app.CRIConfig{Listen: f.criListen, Containerd: f.containerd, VM: f.vm.config()},
		NodeStatus:  nodestatus.Config{RequireRuntime: true},
		Resources:   pool, StaticCPUPolicy: f.pool.static,
	}, nil
}

// loadIdentity loads the node's identity from --data-dir, or from
// --tls-cert, --tls-key and --ca, which are never rewritten: renewals are
// stored in --data-dir, and a renewal newer than those files is the one
// loaded.
func loadIdentity(f flags, logger *slog.Logger) (tls.Certificate, *x509.CertPool, *x509.Certificate, error) {
	if f.cert == "" && f.key == "" && f.ca == "" {
		return edgejoin.Load(f.dataDir)
	}
	if f.cert == "" || f.key == "" || f.ca == "" {
		return tls.Certificate{}, nil, nil, errors.New("--tls-cert, --tls-key and --ca go together")
	}
	pair, pool, leaf, renewed, err := edgejoin.LoadFiles(f.cert, f.key, f.ca, f.dataDir)
	if err != nil {
		return tls.Certificate{}, nil, nil, err
	}
	if renewed {
		logger.Info("using the renewed certificate instead of --tls-cert", "dir", f.dataDir, "serial", leaf.SerialNumber.Text(16))
	}
	return pair, pool, leaf, nil
}

func caOf(f flags) (*x509.Certificate, error) {
	path := f.ca
	if path == "" {
		path = filepath.Join(f.dataDir, edgejoin.CAFile)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read cluster CA: %w", err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, fmt.Errorf("read cluster CA %s: no PEM block", path)
	}
	return x509.ParseCertificate(blk.Bytes)
}
