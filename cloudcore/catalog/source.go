package catalog

import (
	"fmt"

	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/tools/cache"
)

// Source is a further kind of object that belongs to one node each, such
// as a custom resource that names its node in a field. It is the extension
// point for kinds beyond Nodes, Pods, ConfigMaps and Secrets. Each object of
// a source belongs to the edge node NodeName returns, and to no other; it is
// listed by Keys, handed out by Get and notified to subscribers like a Pod.
//
// A source is not shared: the catalog builds its own informer on
// ListerWatcher and runs it in Run.
type Source struct {
	// GroupVersionKind names the objects. Group and Kind go into their keys;
	// all three into Resource and into the apiVersion and kind of Data.
	// Version and Kind are required, and Group and Kind must not be those
	// of another source or of a built-in kind (core Node, Pod, ConfigMap,
	// Secret).
	GroupVersionKind schema.GroupVersionKind
	// ListerWatcher lists and watches the objects, for example a
	// cache.ListWatch around a dynamic client. Every object it returns is
	// cached, so it should be as narrow as the kind allows: one namespace,
	// a label or field selector. Required.
	ListerWatcher cache.ListerWatcher
	// Object is an empty object of the type ListerWatcher returns, such as
	// &unstructured.Unstructured{} for a dynamic client. Required.
	Object runtime.Object
	// NodeName returns the name of the node obj belongs to, or "" for none.
	// It is called from informer goroutines on cached objects, which it
	// must not modify, and must be cheap. Required.
	NodeName func(obj runtime.Object) string
}

// validate checks a source's fields.
func (s *Source) validate() error {
	gvk := s.GroupVersionKind
	switch {
	case gvk.Version == "" || gvk.Kind == "":
		return fmt.Errorf("%w: source %q: version and kind are required", ErrInvalidConfig, gvk)
	case s.ListerWatcher == nil:
		return fmt.Errorf("%w: source %s: ListerWatcher is required", ErrInvalidConfig, gvk)
	case s.Object == nil:
		return fmt.Errorf("%w: source %s: Object is required", ErrInvalidConfig, gvk)
	case s.NodeName == nil:
		return fmt.Errorf("%w: source %s: NodeName is required", ErrInvalidConfig, gvk)
	}
	return nil
}
