package cri

import (
	"context"

	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/tetheredge/tether/edgecore/store"
)

// GetContainerEvents streams container starts and exits of every backend
// that reports them (EventSource), as CONTAINER_STARTED_EVENT and
// CONTAINER_STOPPED_EVENT with the container's status at that moment
// (best effort: empty if the status call fails; the containerd backend
// delivers an exit once its CRI plugin shows it, so a stopped event
// carries the EXITED status with its exit code). Sandboxes' own events
// (known by the id map, or by the backend's NotFound for their id) and
// OOM kills (the exit follows, with reason OOMKilled in the status) are
// not sent, and neither is PodSandboxStatus. The stream ends with
// Unavailable when a backend stops, and it starts with what happens after
// the call: a consumer relists after each (re)connect.
func (s *Server) GetContainerEvents(_ *runtimeapi.GetEventsRequest, stream grpc.ServerStreamingServer[runtimeapi.ContainerEventResponse]) error {
	var srcs []named
	for _, nb := range s.route.all() {
		if _, ok := nb.b.(EventSource); ok {
			srcs = append(srcs, nb)
		}
	}
	if len(srcs) == 0 {
		return status.Error(codes.Unimplemented, "no backend reports container events")
	}
	g, ctx := errgroup.WithContext(stream.Context())
	type sourced struct {
		ev Event
		nb named
	}
	merged := make(chan sourced)
	for _, nb := range srcs {
		ch := nb.b.(EventSource).Events(ctx)
		g.Go(func() error {
			for ev := range ch {
				select {
				case merged <- sourced{ev, nb}:
				case <-ctx.Done():
					return nil
				}
			}
			if ctx.Err() != nil {
				return nil
			}
			return status.Errorf(codes.Unavailable, "backend %s stopped reporting events", nb.name)
		})
	}
	// Headers go out once every source is subscribed, so a client knows
	// from which moment on it sees events.
	if err := stream.SendHeader(metadata.MD{}); err != nil {
		return err
	}
	g.Go(func() error {
		for {
			var in sourced
			select {
			case <-ctx.Done():
				return nil
			case in = <-merged:
			}
			resp, ok := s.eventResponse(ctx, in.ev, in.nb)
			if !ok {
				continue
			}
			if err := stream.Send(resp); err != nil {
				return err
			}
		}
	})
	return g.Wait()
}

// eventResponse is the CRI event of ev; ok is false for what is not sent.
func (s *Server) eventResponse(ctx context.Context, ev Event, nb named) (*runtimeapi.ContainerEventResponse, bool) {
	var typ runtimeapi.ContainerEventType
	switch ev.Kind {
	case EventStart:
		typ = runtimeapi.ContainerEventType_CONTAINER_STARTED_EVENT
	case EventExit:
		typ = runtimeapi.ContainerEventType_CONTAINER_STOPPED_EVENT
	default:
		return nil, false
	}
	if rec, ok, err := s.route.ids.Lookup(ctx, ev.ContainerID); err == nil && ok && rec.Kind == store.RuntimeSandbox {
		return nil, false
	}
	resp := &runtimeapi.ContainerEventResponse{ContainerId: ev.ContainerID, ContainerEventType: typ, CreatedAt: ev.At.UnixNano()}
	st, err := nb.b.ContainerStatus(ctx, ev.ContainerID, false)
	switch {
	case status.Code(err) == codes.NotFound:
		// Not a container: a sandbox whose start came before the shim
		// recorded it, or a container already removed.
		return nil, false
	case err == nil && st.GetStatus() != nil:
		resp.ContainersStatuses = []*runtimeapi.ContainerStatus{st.GetStatus()}
	}
	return resp, true
}
