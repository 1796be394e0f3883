// Package cri is EdgeCore's CRI shim: a CRI v1 server (RuntimeService and
// ImageService over gRPC on a unix socket) that routes each call to a
// runtime backend. The runtime handler of RunPodSandbox picks the backend
// (containerd for the default handler and runc, the VM backend for the VM
// handler); every later call names an id, which the shim routes through an
// id map kept in SQLite, so routing survives an EdgeCore restart. List calls
// fan out to every backend and merge.
//
// The shim only routes and checks: it must not decide what runs (that is the
// pod manager's, which talks to it as to any CRI runtime), and it never
// imports a backend's package: edgecore/app hands it the backends.
package cri

import (
	"context"
	"time"

	internalapi "k8s.io/cri-api/pkg/apis"
)

// Backend is one runtime behind the shim: the CRI client interfaces of
// k8s.io/cri-api, so that a cri-client connection to containerd is a
// Backend as it is. A backend answers codes.Unimplemented for what it
// does not do.
type Backend interface {
	internalapi.RuntimeService
	internalapi.ImageManagerService
}

// EventSource is the optional capability of a backend that reports
// container starts, exits and OOM kills as they happen (containerd 1.6
// has no CRI GetContainerEvents). Events returns a new subscription; the
// channel is closed when ctx ends or the backend stops.
type EventSource interface {
	Events(ctx context.Context) <-chan Event
}

// EventKind is what happened to a container.
type EventKind int

// Event kinds.
const (
	EventStart EventKind = iota + 1
	EventExit
	EventOOM
)

func (k EventKind) String() string {
	switch k {
	case EventStart:
		return "start"
	case EventExit:
		return "exit"
	case EventOOM:
		return "oom"
	}
	return "unknown"
}

// Event is a change of a container's (or a sandbox's) init process.
type Event struct {
	// ContainerID is the CRI container or sandbox id.
	ContainerID string
	Kind        EventKind
	// ExitCode is set for EventExit.
	ExitCode int32
	// At is when the runtime saw it happen.
	At time.Time
}
