package controlplane

import (
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"go.uber.org/goleak"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"
)

// Shared is one control plane for all the tests of a package. The zero value
// is ready to use: declare it next to TestMain, return Run's code from
// TestMain, and call Env in each test that needs the apiserver. The control
// plane starts on the first Env, so `go test -run` of tests that do not need
// it starts nothing, and Run stops it after the last test.
//
// Tests sharing it see each other's objects; Env.Namespace keeps them apart.
type Shared struct {
	mu      sync.Mutex
	env     *Env
	err     error // the first start's failure, repeated to every later test
	stopped bool
}

// Env returns the shared control plane, starting it on first use. It fails tb
// if the control plane could not start.
func (s *Shared) Env(tb testing.TB) *Env {
	tb.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		tb.Fatalf("controlplane: Shared.Env called after Shared.Run returned")
	}
	if s.env == nil && s.err == nil {
		s.env, s.err = New()
		if s.err == nil {
			tb.Logf("controlplane: shared etcd and kube-apiserver ready in %s",
				s.env.StartupTime.Round(time.Millisecond))
		}
	}
	if s.err != nil {
		tb.Fatalf("%v", s.err)
	}
	return s.env
}

// Run runs the tests and then stops the control plane if a test started it.
// It returns the exit code for os.Exit, which is non-zero if stopping failed.
func (s *Shared) Run(m *testing.M) int {
	code := m.Run()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stopped = true
	if s.env == nil {
		return code
	}
	if err := s.env.Stop(); err != nil {
		// No test is left to report it to.
		fmt.Fprintln(os.Stderr, err)
		if code == 0 {
			code = 1
		}
	}
	return code
}

// RunChecked is Run for packages that also check for leaked goroutines:
// it silences envtest's logger (controller-runtime's global one), runs the
// tests, stops the control plane, and then fails the run if goroutines are
// left. Checking after the stop means etcd's and kube-apiserver's process
// goroutines and the clients' connections to them are gone: what is left
// was leaked by a test or by the code under test.
func (s *Shared) RunChecked(m *testing.M) int {
	ctrllog.SetLogger(logr.Discard())
	code := s.Run(m)
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	return code
}
