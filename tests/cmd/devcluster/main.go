// Command devcluster runs a local Kubernetes control plane (the real etcd,
// kube-apiserver and kube-controller-manager from _output/testbin, through
// tests/controlplane, with build/crds installed) for trying Tether on one
// machine, and writes its kubeconfig. `make run` (tests/cmd/quickstart)
// starts the same control plane with everything else. It is for
// development only: nothing persists after it stops.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/tetheredge/tether/tests/controlplane"
)

func main() {
	kubeconfig := flag.String("kubeconfig-out", "_output/dev/kubeconfig", "where to write the kubeconfig")
	flag.Parse()
	if err := run(*kubeconfig); err != nil {
		fmt.Fprintln(os.Stderr, "devcluster:", err)
		os.Exit(1)
	}
}

func run(kubeconfig string) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	env, err := controlplane.New(controlplane.WithControllerManager(controlplane.DevControllerManager()))
	if err != nil {
		return err
	}
	defer func() { _ = env.Stop() }()
	if err := os.MkdirAll(filepath.Dir(kubeconfig), 0o700); err != nil {
		return fmt.Errorf("create kubeconfig directory: %w", err)
	}
	if err := os.WriteFile(kubeconfig, env.KubeConfig, 0o600); err != nil {
		return fmt.Errorf("write kubeconfig: %w", err)
	}
	fmt.Printf("devcluster: kube-apiserver at %s (with kube-controller-manager) ready in %s; kubeconfig in %s\n", env.Config.Host, env.StartupTime.Round(1e6), kubeconfig)
	<-ctx.Done()
	return nil
}
