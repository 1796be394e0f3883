package cri

import (
	"context"
	"fmt"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tetheredge/tether/edgecore/store"
)

// IDMap records which backend owns each sandbox and container id.
// store.RuntimeIDs implements it over SQLite.
type IDMap interface {
	PutSandbox(ctx context.Context, id, backend string) error
	PutContainer(ctx context.Context, id, sandboxID, backend string) error
	Lookup(ctx context.Context, id string) (store.RuntimeID, bool, error)
	Delete(ctx context.Context, id string) error
}

// Backends are the runtimes behind the shim. Default is required; VM may
// be nil (this node runs no virtual machines), and then the VM handler is
// refused with FailedPrecondition.
type Backends struct {
	Default Backend
	VM      Backend
}

// named is a backend with its id map name.
type named struct {
	name string
	b    Backend
}

// router picks the backend of a handler or an id.
type router struct {
	handlers  []string
	vmHandler string
	backends  Backends
	ids       IDMap
}

// forHandler returns the backend of a runtime handler: FailedPrecondition
// for the VM handler without a VM backend, InvalidArgument for a handler
// nobody serves.
func (r *router) forHandler(h string) (named, error) {
	for _, x := range r.handlers {
		if x == h {
			return named{BackendDefault, r.backends.Default}, nil
		}
	}
	if h == r.vmHandler {
		if r.backends.VM == nil {
			return named{}, status.Errorf(codes.FailedPrecondition, "runtime handler %q has no backend on this node", h)
		}
		return named{BackendVM, r.backends.VM}, nil
	}
	known := make([]string, 0, len(r.handlers)+1)
	for _, x := range r.handlers {
		known = append(known, fmt.Sprintf("%q", x))
	}
	known = append(known, fmt.Sprintf("%q", r.vmHandler))
	return named{}, status.Errorf(codes.InvalidArgument, "unknown runtime handler %q (known: %s)", h, strings.Join(known, ", "))
}

// forID returns the backend that owns a sandbox or container id. Ids the
// map does not know (created while EdgeCore was down, or by another client
// of the same containerd) belong to the default backend.
func (r *router) forID(ctx context.Context, id string) (named, error) {
	rec, ok, err := r.ids.Lookup(ctx, id)
	if err != nil {
		return named{}, status.Errorf(codes.Unavailable, "look up the backend of %q: %v", id, err)
	}
	if !ok {
		return named{BackendDefault, r.backends.Default}, nil
	}
	return r.byName(rec.Backend, id)
}

func (r *router) byName(name, id string) (named, error) {
	switch name {
	case BackendDefault:
		return named{BackendDefault, r.backends.Default}, nil
	case BackendVM:
		if r.backends.VM != nil {
			return named{BackendVM, r.backends.VM}, nil
		}
	}
	return named{}, status.Errorf(codes.FailedPrecondition, "%q belongs to backend %q, which is not configured on this node", id, name)
}

// all returns the configured backends, the default first.
func (r *router) all() []named {
	out := []named{{BackendDefault, r.backends.Default}}
	if r.backends.VM != nil {
		out = append(out, named{BackendVM, r.backends.VM})
	}
	return out
}

// fanOut calls fn on every backend and concatenates the results. One
// failing backend fails the call: a partial list would tell the caller
// that the missing pods are gone.
func fanOut[T any](ctx context.Context, r *router, fn func(ctx context.Context, b Backend) ([]T, error)) ([]T, error) {
	var out []T
	for _, nb := range r.all() {
		items, err := fn(ctx, nb.b)
		if err != nil {
			return nil, fmt.Errorf("list on backend %s: %w", nb.name, err)
		}
		out = append(out, items...)
	}
	return out, nil
}
