package app

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/tetheredge/tether/edgecore/cri"
	"github.com/tetheredge/tether/edgecore/nodestatus"
	"github.com/tetheredge/tether/edgecore/pods"
)

// When the shim runs in EdgeCore and no other CRI endpoint is given, the
// pod manager drives the shim itself, over its socket: store -> pods ->
// CRI -> shim route -> backend -> containerd, the same path a kubelet or
// crictl takes. The shim serves only once Run has started, so the CRI
// clients are connected there (connectViaShim), and node status sees the
// runtime through lateRuntime until then.

// lateRuntime is node status' view of a runtime connected after New: not
// reachable until set.
type lateRuntime struct {
	mu sync.Mutex
	rt nodestatus.Runtime
}

func (l *lateRuntime) set(rt nodestatus.Runtime) {
	l.mu.Lock()
	l.rt = rt
	l.mu.Unlock()
}

// RuntimeStatus implements nodestatus.Runtime.
func (l *lateRuntime) RuntimeStatus(ctx context.Context) (nodestatus.RuntimeState, error) {
	l.mu.Lock()
	rt := l.rt
	l.mu.Unlock()
	if rt == nil {
		return nodestatus.RuntimeState{}, errors.New("the CRI shim is not serving yet")
	}
	return rt.RuntimeStatus(ctx)
}

// shimEvents turns the containerd backend's events into the pod manager's.
type shimEvents struct{ ch chan pods.ContainerEvent }

// Events implements pods.EventSource.
func (s shimEvents) Events() <-chan pods.ContainerEvent { return s.ch }

// pump forwards events until ctx ends or the source closes.
func (s shimEvents) pump(ctx context.Context, src <-chan cri.Event) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-src:
			if !ok {
				return nil
			}
			select {
			case s.ch <- pods.ContainerEvent{ContainerID: ev.ContainerID}:
			case <-ctx.Done():
				return nil
			}
		}
	}
}

// connectViaShim connects the pod manager's CRI clients to the shim once it
// serves (retrying while its socket comes up), builds the pod manager and
// tells node status about the runtime.
//
// Each attempt asks the shim's Version on a connection of its own before
// cri-client connects (connectCRI), so retrying until the shim and
// containerd answer leaks nothing.
func (a *App) connectViaShim(ctx context.Context) error {
	delay := 20 * time.Millisecond
	for {
		err := a.connectCRI(ctx)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return nil
		}
		if delay >= time.Second {
			a.logger.Warn("cri shim not answering yet", "err", err)
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		delay = min(2*delay, 2*time.Second)
	}
	if err := a.newPods(); err != nil {
		return fmt.Errorf("pod manager: %w", err)
	}
	a.late.set(nodestatus.CRI{Service: a.rt})
	return nil
}

// runtimeAnswers asks the runtime at the CRI endpoint for its Version,
// within a few seconds, on a connection it closes again (cri.AskVersion
// says why).
func (a *App) runtimeAnswers(ctx context.Context) error {
	target := a.cfg.CRIEndpoint
	if strings.HasPrefix(target, "/") {
		target = "unix://" + target
	}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("dial CRI runtime %s: %w", a.cfg.CRIEndpoint, err)
	}
	defer conn.Close()
	if err := cri.AskVersion(ctx, conn, 5*time.Second); err != nil {
		return fmt.Errorf("CRI runtime %s: %w", a.cfg.CRIEndpoint, err)
	}
	return nil
}
