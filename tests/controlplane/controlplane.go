// Package controlplane runs a real etcd and kube-apiserver for Tether's
// tests, so that anything that talks to Kubernetes is tested against the real
// API server rather than a fake.
//
// The binaries are the ones build/testbin builds into <repo>/_output/testbin
// (`make testbin`); TETHER_TESTBIN names another directory holding
// kube-apiserver and etcd. The project's CRDs from <repo>/build/crds are
// installed before a control plane is handed out. Missing binaries fail the
// test with a hint to run `make testbin`; they never skip it.
//
// Start(tb, WithControllerManager(...)) also runs a real
// kube-controller-manager (by default its node lifecycle and taint eviction
// controllers with timers of seconds), for tests of what the cloud does to
// nodes that stop reporting.
//
// A test that wants its own control plane calls Start. A package whose tests
// can share one declares a Shared next to its TestMain:
//
//	var cp controlplane.Shared
//
//	func TestMain(m *testing.M) { os.Exit(cp.Run(m)) }
//
//	func TestThing(t *testing.T) {
//		env := cp.Env(t)             // started on first use, stopped by Run
//		ns := env.Namespace(t)       // keep tests apart on the shared server
//		...
//	}
//
// envtest logs through controller-runtime's global logger. A test binary that
// has not called sigs.k8s.io/controller-runtime/pkg/log.SetLogger 30 seconds
// after it started gets a one-time warning with a stack trace on stderr when
// a control plane starts later; this package leaves that global alone, so a
// package that minds the noise sets the logger in its TestMain.
//
// This package is test support only: production code must not import it, and
// it must not download binaries or talk to any cluster other than the one it
// started.
package controlplane

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
)

const (
	// startTimeout bounds the start of each of etcd and kube-apiserver. It is
	// generous because a 2-core machine running other test binaries, or the
	// race detector, can slow the apiserver's post-start hooks a lot.
	startTimeout = 60 * time.Second
	// stopTimeout bounds the graceful stop of each process before it is
	// killed.
	stopTimeout = 30 * time.Second
	// cleanupTimeout bounds the API calls a test cleanup makes.
	cleanupTimeout = 30 * time.Second
	// attachOutputEnv, set to "true", copies etcd's and kube-apiserver's
	// output to stderr. It is the variable envtest itself reads for this.
	attachOutputEnv = "KUBEBUILDER_ATTACH_CONTROL_PLANE_OUTPUT"
)

// Env is a running control plane: one etcd and one kube-apiserver, with the
// project's CRDs installed, and a kube-controller-manager when asked.
type Env struct {
	// Config reaches the apiserver as a member of system:masters. Callers may
	// copy it with rest.CopyConfig and change the copy; it is shared.
	Config *rest.Config
	// KubeConfig is Config as a kubeconfig file, for processes under test
	// that take a --kubeconfig.
	KubeConfig []byte
	// StartupTime is how long starting etcd and kube-apiserver and installing
	// the CRDs took.
	StartupTime time.Duration

	env      *envtest.Environment
	cm       *cmProcess // nil without WithControllerManager
	stopOnce sync.Once
	stopErr  error
}

// Start starts a control plane for tb and stops it when tb ends. It fails tb
// if the control plane cannot start, including when the binaries have not
// been built.
func Start(tb testing.TB, opts ...Option) *Env {
	tb.Helper()
	env, err := New(opts...)
	if err != nil {
		tb.Fatalf("%v", err)
	}
	tb.Cleanup(func() {
		if err := env.Stop(); err != nil {
			tb.Errorf("%v", err)
		}
	})
	what := "etcd and kube-apiserver"
	if env.cm != nil {
		what = "etcd, kube-apiserver and kube-controller-manager"
	}
	tb.Logf("controlplane: %s ready in %s", what, env.StartupTime.Round(time.Millisecond))
	return env
}

// New starts a control plane that the caller must Stop. Tests should use
// Start or Shared; New is for code that has no testing.TB.
//
// It returns an error wrapping ErrBinariesMissing when kube-apiserver or etcd
// (or, with WithControllerManager, kube-controller-manager) has not been
// built.
func New(opts ...Option) (*Env, error) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	paths, err := findPaths(o.cm != nil)
	if err != nil {
		return nil, err
	}
	tail := newTailBuffer(outputTail)
	var out io.Writer = tail
	if os.Getenv(attachOutputEnv) == "true" {
		out = io.MultiWriter(tail, os.Stderr)
	}
	te := &envtest.Environment{
		ControlPlane: envtest.ControlPlane{
			APIServer: &envtest.APIServer{Path: paths.apiServer, Out: out, Err: out},
			Etcd:      &envtest.Etcd{Path: paths.etcd, Out: out, Err: out},
		},
		BinaryAssetsDirectory: paths.binDir,
		CRDDirectoryPaths:     []string{paths.crdDir},
		// build/crds is part of the repository, so its absence means the
		// repository root was found wrongly; an empty directory is fine.
		ErrorIfCRDPathMissing:    true,
		ControlPlaneStartTimeout: startTimeout,
		ControlPlaneStopTimeout:  stopTimeout,
		// envtest would otherwise honour USE_EXISTING_CLUSTER and run the
		// tests against whatever cluster the environment points at.
		UseExistingCluster: new(false),
	}
	configureAPIServer(te.ControlPlane.GetAPIServer())
	if o.cm != nil {
		o.cm.configureTolerations(te.ControlPlane.GetAPIServer())
	}

	begin := time.Now()
	cfg, err := te.Start()
	if err != nil {
		// envtest may have started etcd before failing; do not leak it.
		stopErr := te.Stop()
		return nil, fmt.Errorf("controlplane: start etcd and kube-apiserver from %s: %w\n%s",
			paths.binDir, errors.Join(err, stopErr), tail.Tail())
	}
	env := &Env{Config: cfg, KubeConfig: te.KubeConfig, env: te}
	if o.cm != nil {
		if env.cm, err = startControllerManager(paths.controllerManager, te.KubeConfig, o.cm, os.Getenv(attachOutputEnv) == "true"); err != nil {
			return nil, errors.Join(err, te.Stop())
		}
	}
	env.StartupTime = time.Since(begin)
	return env, nil
}

// configureAPIServer adjusts envtest's kube-apiserver flags: loopback
// serving, RBAC, service-account signing keys, and the ServiceAccount
// admission plugin off since no controller manager makes service accounts.
// All of these still hold for kube-apiserver 1.36. It stays a real apiserver:
// every built-in API, admission plugin and post-start hook is left as
// upstream ships it.
//
// --advertise-address is deliberately left to its default (the machine's
// first address): the apiserver rejects 127.0.0.1 as an endpoint of the
// kubernetes Service and would log a sync error every few seconds.
func configureAPIServer(s *envtest.APIServer) {
	// Nothing here scrapes or profiles the test apiserver.
	s.Configure().Set("profiling", "false")
}

// Stop stops kube-controller-manager (if running), kube-apiserver and etcd
// and removes their data. It is safe to call more than once and from
// several goroutines; every call returns the first call's result, which
// includes a controller manager that had exited on its own.
func (e *Env) Stop() error {
	e.stopOnce.Do(func() {
		var errs []error
		if e.cm != nil {
			errs = append(errs, e.cm.stop())
		}
		if err := e.env.Stop(); err != nil {
			errs = append(errs, fmt.Errorf("controlplane: stop etcd and kube-apiserver: %w", err))
		}
		e.stopErr = errors.Join(errs...)
	})
	return e.stopErr
}

// Namespace creates a namespace with a generated name for tb, deletes it when
// tb ends, and returns its name. With no controller manager running, the
// deleted namespace stays Terminating; its name is never reused.
func (e *Env) Namespace(tb testing.TB) string {
	tb.Helper()
	cs, err := kubernetes.NewForConfig(e.Config)
	if err != nil {
		tb.Fatalf("controlplane: build clientset: %v", err)
	}
	ns, err := cs.CoreV1().Namespaces().Create(tb.Context(), &corev1.Namespace{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "test-"},
	}, metav1.CreateOptions{})
	if err != nil {
		tb.Fatalf("controlplane: create namespace: %v", err)
	}
	tb.Cleanup(func() {
		// tb.Context is already cancelled when cleanups run.
		ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
		defer cancel()
		err := cs.CoreV1().Namespaces().Delete(ctx, ns.Name, metav1.DeleteOptions{})
		if err != nil && !apierrors.IsNotFound(err) {
			tb.Errorf("controlplane: delete namespace %s: %v", ns.Name, err)
		}
	})
	return ns.Name
}
