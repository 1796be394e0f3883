package containerd

import (
	"context"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/tetheredge/tether/edgecore/cri"
)

// Exits, settled.
//
// containerd publishes /tasks/exit when the shim reports the process gone.
// Its CRI plugin hears the same event, deletes the task and only then
// records the exit (state EXITED, exit code, finished time). A consumer
// that asks ContainerStatus on the event therefore often still sees
// RUNNING (TestExitEventAfterCRIRecordsIt caught it 3 times in 3). So an
// exit is delivered only once the CRI shows it: each exit gets its own
// goroutine that asks ContainerStatus (PodSandboxStatus for a sandbox) at
// once and then after 5, 10, 20, ... ms, at most 200 ms apart, until the
// CRI agrees or ExitSettle (2 s) has passed. Then it is delivered anyway,
// counted as unsettled and logged: the consumer's relist is the safety
// net. Other events never wait behind an exit; starts and OOM kills are
// delivered as they come, so an exit can overtake nothing of its own
// container but its OOM kill, which comes first anyway.

const (
	settleFirst = 5 * time.Millisecond
	settleMax   = 200 * time.Millisecond
	// settleCall bounds each status call.
	settleCall = time.Second
)

// settleExit delivers the exit ev once the CRI plugin has recorded it, or
// once ExitSettle has passed. Nothing is delivered when ctx ends first.
func (b *Backend) settleExit(ctx context.Context, ev cri.Event) {
	start := time.Now()
	deadline := start.Add(b.cfg.ExitSettle)
	wait := settleFirst
	for {
		recorded, why := b.exitRecorded(ctx, ev.ContainerID)
		if ctx.Err() != nil {
			return
		}
		if recorded {
			b.exits.WithLabelValues("settled").Inc()
			break
		}
		if time.Now().Add(wait).After(deadline) {
			b.exits.WithLabelValues("unsettled").Inc()
			if ok, suppressed := b.lim.Allow("exit_unsettled"); ok {
				b.logger.Warn("exit delivered before the cri plugin recorded it", "container_id", ev.ContainerID,
					"waited", time.Since(start), "status", why, "suppressed", suppressed)
			}
			break
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		wait = min(2*wait, settleMax)
	}
	b.settleWait.Observe(time.Since(start).Seconds())
	b.publish(ev)
}

// exitRecorded reports whether the CRI shows the container (or sandbox)
// id as no longer running: exited, not ready, or gone. why says what it
// saw otherwise.
func (b *Backend) exitRecorded(ctx context.Context, id string) (bool, string) {
	ctx, cancel := context.WithTimeout(ctx, settleCall)
	defer cancel()
	cs, err := b.RuntimeService.ContainerStatus(ctx, id, false)
	if err == nil {
		st := cs.GetStatus().GetState()
		return st == runtimeapi.ContainerState_CONTAINER_EXITED, st.String()
	}
	if status.Code(err) != codes.NotFound {
		return false, err.Error()
	}
	// Not a container: a sandbox, or removed already.
	ss, err := b.RuntimeService.PodSandboxStatus(ctx, id, false)
	switch {
	case status.Code(err) == codes.NotFound:
		return true, "gone"
	case err != nil:
		return false, err.Error()
	}
	st := ss.GetStatus().GetState()
	return st == runtimeapi.PodSandboxState_SANDBOX_NOTREADY, st.String()
}
