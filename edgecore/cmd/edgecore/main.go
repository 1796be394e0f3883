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

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"

	"github.com/tetheredge/tether/common/pki"
	"github.com/tetheredge/tether/edgecore/app"
	edgejoin "github.com/tetheredge/tether/edgecore/join"
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
	fl.StringVar(&f.cert, "tls-cert", "", "node certificate (PEM); default: the one edgecore join stored in --data-dir")
	fl.StringVar(&f.key, "tls-key", "", "node private key (PEM); default: from --data-dir")
	fl.StringVar(&f.ca, "ca", "", "cluster CA (PEM); default: from --data-dir")
	fl.DurationVar(&f.keepAlive, "keepalive", 5*time.Second, "keepalive interval")
	fl.DurationVar(&f.dead, "dead-peer-timeout", 15*time.Second, "silence after which the cloud is declared gone")
	fl.StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
	fl.StringVar(&f.dataDir, "data-dir", "/var/lib/tether/edgecore", "directory of the node's state: SQLite store and, after edgecore join, its identity (node.key, node.crt, ca.crt)")
	root.AddCommand(newJoinCommand())
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
	pair, _, leaf, err := loadIdentity(f)
	if err != nil {
		return err
	}
	if err := edgejoin.CheckUsable(leaf, time.Now()); err != nil {
		return err
	}
	pair.Leaf = leaf
	caCert, err := caOf(f)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	a, err := app.New(ctx, app.Config{
		Cloud: f.cloud, Node: f.node, Certificate: pair, CA: caCert, IdentityDir: f.identityDir(), DataDir: f.dataDir,
		KeepAlive: f.keepAlive, DeadPeerTimeout: f.dead, Logger: logger, Registerer: prometheus.NewRegistry(),
	})
	if err != nil {
		return err
	}
	defer a.Close()
	return a.Run(ctx)
}

// identityDir is where the node's key and certificates live (and where
// renewals are written).
func (f flags) identityDir() string {
	if f.cert != "" {
		return filepath.Dir(f.cert)
	}
	return f.dataDir
}

func loadIdentity(f flags) (tls.Certificate, *x509.CertPool, *x509.Certificate, error) {
	if f.cert == "" && f.key == "" && f.ca == "" {
		return edgejoin.Load(f.dataDir)
	}
	if f.cert == "" || f.key == "" || f.ca == "" {
		return tls.Certificate{}, nil, nil, errors.New("--tls-cert, --tls-key and --ca go together")
	}
	pair, err := tls.LoadX509KeyPair(f.cert, f.key)
	if err != nil {
		return tls.Certificate{}, nil, nil, fmt.Errorf("load node certificate: %w", err)
	}
	pool, err := pki.LoadPool(f.ca)
	if err != nil {
		return tls.Certificate{}, nil, nil, err
	}
	return pair, pool, pair.Leaf, nil
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
