package catalog

import (
	"encoding/json"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/tools/cache"

	"github.com/tetheredge/tether/common/message"
)

// Object is one object as an edge node receives it.
type Object struct {
	// Resource identifies the object: group, version, kind, namespace,
	// name and uid.
	Resource message.Resource
	// Version is the object's resourceVersion. It is opaque: compare it
	// for equality only.
	Version string
	// Data is the object encoded as JSON, with apiVersion and kind set and
	// without metadata.managedFields or the kubectl last-applied
	// annotation.
	Data []byte
}

// kubeObject is what every object the catalog caches is: typed API objects
// and unstructured.Unstructured alike.
type kubeObject interface {
	runtime.Object
	metav1.Object
}

// stripTransform returns the informer transform for objects of kind gvk.
// It drops what no edge needs and that costs memory in every cached copy
// (metadata.managedFields, often the largest part of a small object, and the
// kubectl last-applied annotation, a second copy of the object), and it sets
// apiVersion and kind, which decoded list and watch items of typed informers
// leave empty, so that encoding an object for an edge is a plain
// json.Marshal.
//
// Informers call it on freshly decoded objects before anyone else sees them
// (client-go 1.27 and later), so it mutates them in place. It is idempotent.
func stripTransform(gvk schema.GroupVersionKind) cache.TransformFunc {
	return func(obj any) (any, error) {
		o, ok := obj.(kubeObject)
		if !ok {
			return obj, nil // a tombstone: its object was transformed already
		}
		o.SetManagedFields(nil)
		// Unstructured returns a copy of the annotations; typed objects
		// their own map. Writing back the result suits both.
		if a := o.GetAnnotations(); a != nil {
			if _, ok := a[corev1.LastAppliedConfigAnnotation]; ok {
				delete(a, corev1.LastAppliedConfigAnnotation)
				if len(a) == 0 {
					a = nil
				}
				o.SetAnnotations(a)
			}
		}
		o.GetObjectKind().SetGroupVersionKind(gvk)
		return obj, nil
	}
}

// encode turns a cached object into what an edge receives. Cached objects
// are never modified, so encode may run without any lock.
func encode(gvk schema.GroupVersionKind, o kubeObject) (Object, error) {
	data, err := json.Marshal(o)
	if err != nil {
		return Object{}, fmt.Errorf("encode %s %s/%s: %w", gvk.Kind, o.GetNamespace(), o.GetName(), err)
	}
	return Object{
		Resource: message.Resource{
			Group:     gvk.Group,
			Version:   gvk.Version,
			Kind:      gvk.Kind,
			Namespace: o.GetNamespace(),
			Name:      o.GetName(),
			UID:       string(o.GetUID()),
		},
		Version: o.GetResourceVersion(),
		Data:    data,
	}, nil
}
