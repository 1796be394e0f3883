// Command edgecore is Tether's edge side: it keeps a session to the cloud.
// This file only reads its configuration (defaults, --config FILE,
// flags) and hands it to edgecore/app.
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

	"github.com/tetheredge/tether/common/configfile"
	"github.com/tetheredge/tether/common/logging"
	"github.com/tetheredge/tether/common/serve"
	"github.com/tetheredge/tether/edgecore/app"
	"github.com/tetheredge/tether/edgecore/config"
	edgejoin "github.com/tetheredge/tether/edgecore/join"
	"github.com/tetheredge/tether/edgecore/nodestatus"
)

func main() {
	if err := newRootCommand().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "edgecore:", err)
		os.Exit(1)
	}
}

func newRootCommand() *cobra.Command { return newCommand(run) }

// newCommand is the edgecore command; runFn is what it does with the
// configuration (tests look at it instead).
func newCommand(runFn func(context.Context, config.EdgeCoreConfiguration) error) *cobra.Command {
	root := &cobra.Command{
		Use:   "edgecore",
		Short: "Tether's edge side: stays connected to CloudCore",
		Long: "Tether's edge side: stays connected to CloudCore and runs this node's pods and VMs.\n" +
			"Settings come from the defaults, then --config FILE (edgecore config default prints one), then the flags given.",
		SilenceUsage:  true,
		SilenceErrors: true,
		Args:          cobra.NoArgs,
	}
	err := configfile.Command(root, configfile.Daemon[config.EdgeCoreConfiguration]{
		Kind: config.Kind, Defaults: config.Default, DefaultFile: config.DefaultFile,
		Validate: config.EdgeCoreConfiguration.Validate,
	}, runFn)
	if err != nil {
		// The configuration's type is wrong: a programming error.
		panic(err)
	}
	root.AddCommand(newJoinCommand(), newCRICommand(), newVMImageCommand())
	return root
}

func run(ctx context.Context, c config.EdgeCoreConfiguration) error {
	level, err := configfile.ParseLevel(c.Ops.LogLevel)
	if err != nil {
		return err
	}
	logger := logging.New(os.Stderr, level)
	cfg, err := appConfig(c, logger)
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

// appConfig is where each setting of the file goes in EdgeCore, with the
// node's identity loaded.
func appConfig(c config.EdgeCoreConfiguration, logger *slog.Logger) (app.Config, error) {
	pair, _, leaf, err := loadIdentity(c.Node, logger)
	if err != nil {
		return app.Config{}, err
	}
	if err := edgejoin.CheckUsable(leaf, time.Now()); err != nil {
		return app.Config{}, err
	}
	pair.Leaf = leaf
	pool, err := poolConfig(c.ResourcePool)
	if err != nil {
		return app.Config{}, err
	}
	caCert, err := caOf(c.Node)
	if err != nil {
		return app.Config{}, err
	}
	reg, err := serve.NewRegistry()
	if err != nil {
		return app.Config{}, err
	}
	// Renewals are stored in the data directory, also with node.tlsCert:
	// the files the configuration names are the operator's.
	return app.Config{
		Cloud: c.Tunnel.Cloud, Node: c.Node.Name, Certificate: pair, CA: caCert, IdentityDir: c.Node.DataDir, DataDir: c.Node.DataDir,
		KeepAlive: c.Tunnel.KeepAlive.Duration, DeadPeerTimeout: c.Tunnel.DeadPeerTimeout.Duration,
		Logger: logger, Registerer: reg, MetricsAddr: c.Ops.MetricsAddr,
		// The node is Ready only when its container runtime answers; with
		// none it is NotReady, ContainerRuntimeUnreachable: nothing can
		// run on it.
		CRIEndpoint: c.Runtime.Endpoint,
		CRI:         app.CRIConfig{Listen: c.Runtime.CRIListen, Containerd: c.Runtime.Containerd, VM: vmConfig(c.VM)},
		NodeStatus:  nodestatus.Config{RequireRuntime: true},
		Resources:   pool, StaticCPUPolicy: c.ResourcePool.StaticCPUPolicy,
	}, nil
}

// loadIdentity loads the node's identity from node.dataDir, or from
// node.tlsCert, node.tlsKey and node.ca, which are never rewritten:
// renewals are stored in node.dataDir, and a renewal newer than those
// files is the one loaded.
func loadIdentity(n config.Node, logger *slog.Logger) (tls.Certificate, *x509.CertPool, *x509.Certificate, error) {
	if n.TLSCert == "" && n.TLSKey == "" && n.CA == "" {
		if !hasIdentity(n.DataDir) {
			return tls.Certificate{}, nil, nil, fmt.Errorf("no node identity in %s (no %s): join this node first "+
				"(edgecore join --cloud HOST:10002 --node %s --token-file FILE --data-dir %s), "+
				"or give the --data-dir it joined into", n.DataDir, edgejoin.IdentityFile, n.Name, n.DataDir)
		}
		return edgejoin.Load(n.DataDir)
	}
	if n.TLSCert == "" || n.TLSKey == "" || n.CA == "" {
		return tls.Certificate{}, nil, nil, errors.New("node.tlsCert, node.tlsKey and node.ca (--tls-cert, --tls-key and --ca) go together")
	}
	pair, pool, leaf, renewed, err := edgejoin.LoadFiles(n.TLSCert, n.TLSKey, n.CA, n.DataDir)
	if err != nil {
		return tls.Certificate{}, nil, nil, err
	}
	if renewed {
		logger.Info("using the renewed certificate instead of --tls-cert", "dir", n.DataDir, "serial", leaf.SerialNumber.Text(16))
	}
	return pair, pool, leaf, nil
}

// hasIdentity says whether dir holds an identity edgecore join stored,
// in its file or in the two files of earlier versions.
func hasIdentity(dir string) bool {
	for _, f := range []string{edgejoin.IdentityFile, edgejoin.CertFile} {
		if _, err := os.Lstat(filepath.Join(dir, f)); err == nil {
			return true
		}
	}
	return false
}

func caOf(n config.Node) (*x509.Certificate, error) {
	path := n.CA
	if path == "" {
		path = filepath.Join(n.DataDir, edgejoin.CAFile)
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
