package containerd

import (
	"context"
	"fmt"
	"time"

	eventsapi "github.com/containerd/containerd/api/events"
	eventsvc "github.com/containerd/containerd/api/services/events/v1"
	"github.com/containerd/containerd/api/types"
	"google.golang.org/grpc/metadata"

	"github.com/tetheredge/tether/edgecore/cri"
)

// containerd's events, as the shim uses them.
//
// Subscribe to containerd.services.events.v1.Events on containerd's socket
// with ONE filter string, `namespace=="k8s.io",topic~="^/tasks/"`: filters
// in the list are OR'ed, the commas inside one are AND'ed (docs/runtime.md,
// "Facts"). Each envelope carries the topic and an Any:
//
//	/tasks/start  containerd.events.TaskStart {container_id, pid}
//	/tasks/exit   containerd.events.TaskExit  {container_id, id, pid, exit_status, exited_at}
//	/tasks/oom    containerd.events.TaskOOM   {container_id}
//
// A TaskExit whose id is not the container id is an exec'd process ending,
// not the container: it is dropped. Other /tasks/ topics (create, delete,
// exec-added, paused...) are dropped too.

// eventFilter selects the task events of the CRI plugin's namespace.
func eventFilter(namespace string) string {
	return fmt.Sprintf(`namespace==%q,topic~="^/tasks/"`, namespace)
}

// decode turns an envelope into an event; ok is false for envelopes the
// shim does not report.
func decode(env *types.Envelope, received time.Time) (ev cri.Event, ok bool, err error) {
	if env.GetEvent() == nil {
		return cri.Event{}, false, nil
	}
	at := received
	if ts := env.GetTimestamp(); ts != nil {
		at = ts.AsTime()
	}
	switch env.GetTopic() {
	case "/tasks/start":
		var e eventsapi.TaskStart
		if err := env.GetEvent().UnmarshalTo(&e); err != nil {
			return cri.Event{}, false, fmt.Errorf("decode %s: %w", env.GetTopic(), err)
		}
		return cri.Event{ContainerID: e.GetContainerID(), Kind: cri.EventStart, At: at}, e.GetContainerID() != "", nil
	case "/tasks/exit":
		var e eventsapi.TaskExit
		if err := env.GetEvent().UnmarshalTo(&e); err != nil {
			return cri.Event{}, false, fmt.Errorf("decode %s: %w", env.GetTopic(), err)
		}
		if e.GetContainerID() == "" || (e.GetID() != "" && e.GetID() != e.GetContainerID()) {
			return cri.Event{}, false, nil // an exec'd process
		}
		if ts := e.GetExitedAt(); ts != nil {
			at = ts.AsTime()
		}
		return cri.Event{ContainerID: e.GetContainerID(), Kind: cri.EventExit, ExitCode: int32(e.GetExitStatus()), At: at}, true, nil
	case "/tasks/oom":
		var e eventsapi.TaskOOM
		if err := env.GetEvent().UnmarshalTo(&e); err != nil {
			return cri.Event{}, false, fmt.Errorf("decode %s: %w", env.GetTopic(), err)
		}
		return cri.Event{ContainerID: e.GetContainerID(), Kind: cri.EventOOM, At: at}, e.GetContainerID() != "", nil
	}
	return cri.Event{}, false, nil
}

// Events returns a subscription to the backend's events. It delivers what
// happens while Run runs; a subscriber that falls 256 events behind loses
// the newest ones (logged), so a consumer keeps a relist as its
// safety net. The channel is closed when ctx ends or Run returns.
func (b *Backend) Events(ctx context.Context) <-chan cri.Event { return b.events.Subscribe(ctx) }

// Run subscribes to containerd's events until ctx ends, and subscribes
// again, with back-off, whenever the stream drops. Events lost while the
// stream was down are not replayed: consumers relist after OnReconnect.
func (b *Backend) Run(ctx context.Context) error {
	defer b.events.Close()
	client := eventsvc.NewEventsClient(b.conn)
	ctx = metadata.AppendToOutgoingContext(ctx, "containerd-namespace", b.cfg.Namespace)
	wait := b.cfg.MinBackoff
	for {
		started := time.Now()
		err := b.subscribeOnce(ctx, client)
		if ctx.Err() != nil {
			return nil
		}
		if time.Since(started) > b.cfg.MaxBackoff {
			wait = b.cfg.MinBackoff // the stream was up for a while
		}
		b.logger.Warn("containerd event stream ended", "err", err, "retry_in", wait)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		wait = min(2*wait, b.cfg.MaxBackoff)
	}
}

func (b *Backend) subscribeOnce(ctx context.Context, client eventsvc.EventsClient) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := client.Subscribe(ctx, &eventsvc.SubscribeRequest{Filters: []string{eventFilter(b.cfg.Namespace)}})
	if err != nil {
		return fmt.Errorf("subscribe: %w", err)
	}
	b.reconnects.signal()
	for {
		env, err := stream.Recv()
		if err != nil {
			return fmt.Errorf("receive: %w", err)
		}
		ev, ok, err := decode(env, time.Now())
		if err != nil {
			if ok, suppressed := b.lim.Allow("event_undecodable"); ok {
				b.logger.Warn("containerd event dropped", "topic", env.GetTopic(), "err", err, "suppressed", suppressed)
			}
			continue
		}
		if ok {
			if dropped := b.events.Publish(ev); dropped > 0 {
				if ok, suppressed := b.lim.Allow("event_dropped"); ok {
					b.logger.Warn("container event dropped for slow subscribers", "container_id", ev.ContainerID, "kind", ev.Kind.String(), "subscribers", dropped, "suppressed", suppressed)
				}
			}
		}
	}
}

// OnReconnect returns a channel that receives a value each time the event
// stream is subscribed (again), after which a consumer should relist: what
// happened while it was down is not replayed. Capacity 1: reconnects
// coalesce.
func (b *Backend) OnReconnect() <-chan struct{} { return b.reconnects }

// reconnects signals (re)subscriptions; capacity 1: they coalesce.
type reconnects chan struct{}

func (r reconnects) signal() {
	select {
	case r <- struct{}{}:
	default:
	}
}
