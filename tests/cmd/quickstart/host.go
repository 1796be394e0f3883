package main

import (
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/tetheredge/tether/tests/containerd"
)

// hostTB is the testing.TB that tests/containerd gets from the quickstart.
// tests/containerd is the one place that knows how to run a private
// containerd (config, images, the CRI, and a teardown that removes every
// sandbox and reports any process, mount or network namespace left), and
// it reports through a testing.TB; the quickstart lends it this one rather
// than keep a second copy of that code. Fatalf ends the calling goroutine
// (as it does in a test) after recording the error; Errorf records it;
// Logf prints. Every other method of testing.TB is one tests/containerd
// does not call, and would panic on the nil embedded interface.
type hostTB struct {
	testing.TB

	mu       sync.Mutex
	errs     []error
	cleanups []func()
	logf     func(format string, args ...any)
}

func (t *hostTB) Helper() {}

func (t *hostTB) Logf(format string, args ...any) { t.logf(format, args...) }

func (t *hostTB) Errorf(format string, args ...any) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.errs = append(t.errs, fmt.Errorf(format, args...))
}

func (t *hostTB) Fatalf(format string, args ...any) {
	t.Errorf(format, args...)
	panic(errFatal)
}

func (t *hostTB) Failed() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.errs) > 0
}

func (t *hostTB) Cleanup(f func()) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.cleanups = append(t.cleanups, f)
}

// errFatal is the panic value of hostTB.Fatalf, recovered by startHost.
var errFatal = errors.New("quickstart: containerd host failed")

// err is every error recorded so far.
func (t *hostTB) err() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return errors.Join(t.errs...)
}

// cleanup runs the registered cleanups, last first, as testing does, and
// returns every error recorded.
func (t *hostTB) cleanup() error {
	t.mu.Lock()
	fs := t.cleanups
	t.cleanups = nil
	t.mu.Unlock()
	for i := len(fs) - 1; i >= 0; i-- {
		fs[i]()
	}
	return t.err()
}

// startHost starts a private containerd (with the CNI bridge, the pause
// and busybox images imported). Its directory is tests/containerd's, in
// os.TempDir() (/tmp/tether-ctrd-*: its socket path must stay short): a
// host left by a quickstart that was killed is reaped by the next start of
// any tests/containerd host, as a killed test binary's is. (Moving it
// under the quickstart's directory by changing $TMPDIR would also move the
// CNI slot locks that keep concurrent hosts' bridges apart.) The returned
// stop tears it down and returns anything it had to clean up by force.
func startHost(logf func(string, ...any)) (h *containerd.Host, stop func() error, err error) {
	tb := &hostTB{logf: logf}
	defer func() {
		if r := recover(); r != nil {
			if r != errFatal { //nolint:errorlint // the sentinel itself, never wrapped
				panic(r)
			}
			h, stop, err = nil, nil, errors.Join(tb.err(), tb.cleanup())
		}
	}()
	h = containerd.Start(tb, containerd.WithCNI())
	return h, tb.cleanup, nil
}
