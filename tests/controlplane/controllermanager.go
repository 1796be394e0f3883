package controlplane

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"sigs.k8s.io/controller-runtime/pkg/envtest"
)

// Option changes what New and Start run.
type Option func(*options)

type options struct {
	cm *ControllerManager
}

// ControllerManager configures the kube-controller-manager that
// WithControllerManager runs. Zero values mean the defaults beside each
// field, chosen so that the node lifecycle acts within seconds.
type ControllerManager struct {
	// Controllers is its --controllers. Default
	// node-lifecycle-controller and taint-eviction-controller (the names
	// of kube-controller-manager v1.36).
	Controllers []string
	// NodeMonitorPeriod and NodeMonitorGracePeriod are its flags of those
	// names. Defaults 1s and 5s (upstream: 5s and 50s).
	NodeMonitorPeriod, NodeMonitorGracePeriod time.Duration
	// TolerationSeconds is the apiserver's
	// --default-not-ready-toleration-seconds and
	// --default-unreachable-toleration-seconds: how long a pod without its
	// own toleration stays on a NotReady or unreachable node before the
	// taint eviction controller deletes it. Default 2 (upstream: 300).
	TolerationSeconds int
	// Args are more flags, appended last.
	Args []string
}

// WithControllerManager also runs a real kube-controller-manager (built by
// build/testbin next to kube-apiserver) against the control plane, as a
// member of system:masters, without leader election or a serving port. The
// apiserver gets the default toleration seconds of cm. It is stopped before
// the apiserver.
func WithControllerManager(cm ControllerManager) Option {
	return func(o *options) {
		if len(cm.Controllers) == 0 {
			cm.Controllers = []string{"node-lifecycle-controller", "taint-eviction-controller"}
		}
		if cm.NodeMonitorPeriod <= 0 {
			cm.NodeMonitorPeriod = time.Second
		}
		if cm.NodeMonitorGracePeriod <= 0 {
			cm.NodeMonitorGracePeriod = 5 * time.Second
		}
		if cm.TolerationSeconds <= 0 {
			cm.TolerationSeconds = 2
		}
		o.cm = &cm
	}
}

// DevControllerManager is the kube-controller-manager of the development
// clusters (tests/cmd/devcluster, tests/cmd/quickstart): upstream's node
// lifecycle timers and toleration seconds, and the controllers a first
// user meets (Deployments and ReplicaSets, garbage collection of owned
// objects, namespace deletion). It runs no scheduler and no service
// account controllers (the apiserver runs without the ServiceAccount
// admission plugin).
func DevControllerManager() ControllerManager {
	return ControllerManager{
		Controllers: []string{
			"node-lifecycle-controller", "taint-eviction-controller",
			"deployment-controller", "replicaset-controller",
			"garbage-collector-controller", "namespace-controller",
		},
		NodeMonitorPeriod:      5 * time.Second,
		NodeMonitorGracePeriod: 50 * time.Second,
		TolerationSeconds:      300,
	}
}

// configureTolerations sets the apiserver's default toleration seconds
// (the DefaultTolerationSeconds admission plugin, on by default).
func (cm *ControllerManager) configureTolerations(s *envtest.APIServer) {
	secs := strconv.Itoa(cm.TolerationSeconds)
	s.Configure().Set("default-not-ready-toleration-seconds", secs)
	s.Configure().Set("default-unreachable-toleration-seconds", secs)
}

// cmProcess is a running kube-controller-manager.
type cmProcess struct {
	cmd  *exec.Cmd
	dir  string
	out  *tailBuffer
	done chan struct{} // closed when the process has exited
	err  error         // Wait's result, set before done is closed

	stopOnce sync.Once
	stopErr  error
}

// startControllerManager starts bin with a kubeconfig file holding
// kubeconfig.
func startControllerManager(bin string, kubeconfig []byte, cm *ControllerManager, attach bool) (*cmProcess, error) {
	dir, err := os.MkdirTemp("", "tether-kcm-")
	if err != nil {
		return nil, fmt.Errorf("controlplane: create kube-controller-manager directory: %w", err)
	}
	kc := filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(kc, kubeconfig, 0o600); err != nil {
		_ = os.RemoveAll(dir)
		return nil, fmt.Errorf("controlplane: write kube-controller-manager kubeconfig: %w", err)
	}
	args := []string{
		"--kubeconfig=" + kc,
		"--controllers=" + strings.Join(cm.Controllers, ","),
		"--node-monitor-period=" + cm.NodeMonitorPeriod.String(),
		"--node-monitor-grace-period=" + cm.NodeMonitorGracePeriod.String(),
		"--leader-elect=false",
		"--secure-port=0",
	}
	args = append(args, cm.Args...)
	p := &cmProcess{dir: dir, out: newTailBuffer(outputTail), done: make(chan struct{})}
	var out io.Writer = p.out
	if attach {
		out = io.MultiWriter(p.out, os.Stderr)
	}
	p.cmd = exec.Command(bin, args...) //nolint:gosec // the test binary built by build/testbin
	p.cmd.Stdout, p.cmd.Stderr = out, out
	if err := p.cmd.Start(); err != nil {
		_ = os.RemoveAll(dir)
		return nil, fmt.Errorf("controlplane: start kube-controller-manager: %w", err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// stop ends the process (SIGTERM, then SIGKILL after stopTimeout) and
// removes its directory. A process that had exited on its own is an error,
// with its last output.
func (p *cmProcess) stop() error {
	p.stopOnce.Do(func() {
		defer func() { _ = os.RemoveAll(p.dir) }()
		select {
		case <-p.done:
			p.stopErr = fmt.Errorf("controlplane: kube-controller-manager exited early: %w\n%s", p.err, p.tail())
			return
		default:
		}
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		timer := time.NewTimer(stopTimeout)
		defer timer.Stop()
		select {
		case <-p.done:
		case <-timer.C:
			_ = p.cmd.Process.Kill()
			<-p.done
			p.stopErr = errors.New("controlplane: kube-controller-manager did not stop on SIGTERM; killed")
		}
	})
	return p.stopErr
}

func (p *cmProcess) tail() string {
	return strings.Replace(p.out.Tail(), "etcd and kube-apiserver", "kube-controller-manager", 1)
}
