package vm

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	nodev1 "k8s.io/api/node/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/yaml"

	"github.com/tetheredge/tether/tests/controlplane"
	"github.com/tetheredge/tether/tests/promtest"
	"github.com/tetheredge/tether/tests/testlog"
)

// cp is the real etcd and kube-apiserver the tests of this package share.
var cp controlplane.Shared

func TestMain(m *testing.M) { os.Exit(cp.RunChecked(m)) }

// waitFor bounds every Eventually: the machine is small and shared.
const waitFor = 60 * time.Second

// clients are the test's clients on the shared control plane.
type clients struct {
	cfg  *rest.Config
	kube kubernetes.Interface
	dyn  dynamic.Interface
	vms  *Client
	ns   string
}

func newClients(t *testing.T) *clients {
	t.Helper()
	env := cp.Env(t)
	rc := rest.CopyConfig(env.Config)
	rc.QPS, rc.Burst = 1000, 1000
	kube, err := kubernetes.NewForConfig(rc)
	require.NoError(t, err)
	dyn, err := dynamic.NewForConfig(rc)
	require.NoError(t, err)
	return &clients{cfg: rc, kube: kube, dyn: dyn, vms: NewClient(dyn), ns: env.Namespace(t)}
}

var runtimeClassOnce sync.Once

// readRuntimeClass decodes build/runtimeclass-vm.yaml.
func readRuntimeClass(t *testing.T) *nodev1.RuntimeClass {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "build", "runtimeclass-vm.yaml"))
	require.NoError(t, err)
	var rc nodev1.RuntimeClass
	require.NoError(t, yaml.UnmarshalStrict(b, &rc))
	return &rc
}

// installRuntimeClass applies build/runtimeclass-vm.yaml once: the
// RuntimeClass admission plugin refuses pods whose class does not exist.
func installRuntimeClass(t *testing.T, c *clients) {
	t.Helper()
	rc := readRuntimeClass(t)
	runtimeClassOnce.Do(func() {
		_, err := c.kube.NodeV1().RuntimeClasses().Create(t.Context(), rc, metav1.CreateOptions{})
		if !apierrors.IsAlreadyExists(err) {
			require.NoError(t, err)
		}
	})
}

// running is a controller under test with its own metrics.
type running struct {
	c      *Controller
	reg    *promtest.Registry
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
}

// start runs a controller on the test's namespace until the test ends.
func start(t *testing.T, c *clients, cfg Config) *running {
	t.Helper()
	reg := promtest.NewRegistry()
	cfg.Namespace, cfg.Registerer, cfg.Logger = c.ns, reg, testlog.New()
	if cfg.LeaderElection.Namespace == "" && !cfg.LeaderElection.Disabled {
		cfg.LeaderElection.Disabled = true
	}
	ctl, err := New(c.kube, c.dyn, cfg)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{c: ctl, reg: reg, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- ctl.Run(ctx) }()
	t.Cleanup(func() { r.stop(t) })
	return r
}

// stop stops the controller and checks Run's result; it may be called
// more than once.
func (r *running) stop(t *testing.T) {
	r.once.Do(func() {
		r.cancel()
		select {
		case err := <-r.done:
			require.NoError(t, err)
		case <-time.After(waitFor):
			t.Errorf("controller did not stop")
		}
	})
}

func (r *running) counter(t *testing.T, name string, labels map[string]string) float64 {
	t.Helper()
	return promtest.Sum(t, r.reg, name, labels)
}
