// Command quickstart is `make run`: on one machine it starts the local
// control plane (etcd, kube-apiserver and kube-controller-manager from
// _output/testbin, with build/crds and the VM RuntimeClass), CloudCore, a
// containerd of its own, and one EdgeCore joined through the real
// whitelist flow (cloudcore admin allow, a token file, edgecore join) with
// the in-process CRI shim and the VM backend; then it creates a pod and a
// VirtualMachine and prints, as they happen, the edge node turning Ready,
// the pod Running and the VM booted. It leaves the system running until
// Ctrl-C, and then stops it, leaving nothing running or mounted.
//
// It is for trying Tether on a development machine, as root (containerd
// and QEMU): nothing persists after it stops, and it must not be pointed
// at a real cluster. The binaries it runs are the ones `make build` put in
// --bin; this file only parses flags, quickstart.go wires the parts.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/go-logr/logr"
	crlog "sigs.k8s.io/controller-runtime/pkg/log"
)

// childEnv marks the quickstart process that does the work; see main.
const childEnv = "TETHER_QUICKSTART_CHILD"

func main() {
	var cfg Config
	root, err := repoRoot()
	if err != nil {
		fmt.Fprintln(os.Stderr, "quickstart:", err)
		os.Exit(1)
	}
	out := filepath.Join(root, "_output")
	flag.StringVar(&cfg.Dir, "dir", filepath.Join(out, "dev"), "directory of this run's state and logs (cleared at start)")
	flag.StringVar(&cfg.Bin, "bin", filepath.Join(out, "bin"), "directory holding cloudcore and edgecore (make build)")
	flag.StringVar(&cfg.Kubectl, "kubectl", filepath.Join(out, "bin", "kubectl"), "the kubectl named in the printed commands (make kubectl)")
	flag.StringVar(&cfg.Node, "node", "edge-1", "the edge node's name")
	flag.StringVar(&cfg.TunnelAddr, "tunnel-addr", "127.0.0.1:10000", "CloudCore's tunnel address (QUIC on UDP, WebSocket on TCP)")
	flag.StringVar(&cfg.JoinAddr, "join-addr", "127.0.0.1:10002", "CloudCore's HTTPS join address")
	flag.StringVar(&cfg.CloudMetrics, "cloud-metrics-addr", "127.0.0.1:10350", "CloudCore's /metrics and health address (0 disables)")
	flag.StringVar(&cfg.EdgeMetrics, "edge-metrics-addr", "127.0.0.1:10351", "EdgeCore's /metrics and health address (0 disables)")
	flag.BoolVar(&cfg.ExitAfterReady, "exit-after-ready", false, "stop everything once the pod runs and the VM booted (for CI)")
	flag.Parse()
	cfg.Root, cfg.Out = root, os.Stdout
	for _, p := range []*string{&cfg.Dir, &cfg.Bin} {
		if *p, err = filepath.Abs(*p); err != nil {
			fmt.Fprintln(os.Stderr, "quickstart:", err)
			os.Exit(1)
		}
	}
	if os.Getenv(childEnv) == "" {
		os.Exit(parent())
	}
	// envtest (inside tests/controlplane) logs through controller-runtime's
	// global logger; the quickstart prints its own progress.
	crlog.SetLogger(logr.Discard())
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() {
		<-ctx.Done()
		stop() // a second Ctrl-C kills at once
	}()
	if err := run(ctx, cfg); err != nil {
		fmt.Fprintln(os.Stderr, "quickstart:", err)
		os.Exit(1)
	}
}

// parent runs the quickstart again as a child in a process group of its
// own and forwards SIGINT and SIGTERM to it. Ctrl-C in a terminal signals
// the whole foreground process group; without this, etcd, kube-apiserver,
// containerd, CloudCore and EdgeCore would all get it at once and die in
// any order, instead of the orderly stop (the edge drains its pods and
// VMs first) that the child does on the one signal it is forwarded.
func parent() int {
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintln(os.Stderr, "quickstart:", err)
		return 1
	}
	cmd := exec.Command(self, os.Args[1:]...)
	cmd.Env = append(os.Environ(), childEnv+"=1")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	if err := cmd.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "quickstart:", err)
		return 1
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	for {
		select {
		case s := <-sigs:
			_ = cmd.Process.Signal(s)
		case err := <-done:
			var exit *exec.ExitError
			if errors.As(err, &exit) {
				return max(exit.ExitCode(), 1)
			}
			if err != nil {
				fmt.Fprintln(os.Stderr, "quickstart:", err)
				return 1
			}
			return 0
		}
	}
}

// repoRoot walks up from the working directory to the directory holding
// go.mod and build/runtimeclass-vm.yaml.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("get working directory: %w", err)
	}
	for {
		_, e1 := os.Stat(filepath.Join(dir, "go.mod"))
		_, e2 := os.Stat(filepath.Join(dir, "build", "runtimeclass-vm.yaml"))
		if e1 == nil && e2 == nil {
			return dir, nil
		}
		up := filepath.Dir(dir)
		if up == dir {
			return "", errors.New("run it from the Tether repository (no go.mod with build/runtimeclass-vm.yaml above the working directory)")
		}
		dir = up
	}
}
