package pods

import (
	"sync"

	corev1 "k8s.io/api/core/v1"
)

// objectRefs records which ConfigMaps and Secrets each stored pod uses
// (volumes, projected sources, env and envFrom), so that a store change of
// one enqueues its pods at once, and their volumes and waiting containers
// see it without waiting for the relist. sync sets a pod's references each
// time it reads the pod and drops them when the pod is gone. The zero value
// is ready to use.
type objectRefs struct {
	mu    sync.Mutex
	byPod map[string][]string        // pod key -> object keys
	byObj map[string]map[string]bool // object key -> pod keys
}

// objectKey names a ConfigMap or Secret of a namespace.
func objectKey(kind, namespace, name string) string { return kind + "/" + namespace + "/" + name }

// set records the objects pod (key podKey) uses, replacing what was
// recorded before.
func (r *objectRefs) set(podKey string, pod *corev1.Pod) {
	objs := podObjects(pod)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.dropLocked(podKey)
	if len(objs) == 0 {
		return
	}
	if r.byPod == nil {
		r.byPod, r.byObj = map[string][]string{}, map[string]map[string]bool{}
	}
	r.byPod[podKey] = objs
	for _, o := range objs {
		if r.byObj[o] == nil {
			r.byObj[o] = map[string]bool{}
		}
		r.byObj[o][podKey] = true
	}
}

// drop forgets podKey's references.
func (r *objectRefs) drop(podKey string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.dropLocked(podKey)
}

func (r *objectRefs) dropLocked(podKey string) {
	for _, o := range r.byPod[podKey] {
		delete(r.byObj[o], podKey)
		if len(r.byObj[o]) == 0 {
			delete(r.byObj, o)
		}
	}
	delete(r.byPod, podKey)
}

// pods returns the keys of the pods that use the object.
func (r *objectRefs) pods(kind, namespace, name string) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	set := r.byObj[objectKey(kind, namespace, name)]
	out := make([]string, 0, len(set))
	for k := range set {
		out = append(out, k)
	}
	return out
}

// podObjects are the keys of the ConfigMaps and Secrets pod uses, each
// once.
func podObjects(pod *corev1.Pod) []string {
	seen := map[string]bool{}
	var out []string
	add := func(kind, name string) {
		if name == "" {
			return
		}
		if k := objectKey(kind, pod.Namespace, name); !seen[k] {
			seen[k] = true
			out = append(out, k)
		}
	}
	for _, v := range pod.Spec.Volumes {
		switch {
		case v.ConfigMap != nil:
			add("ConfigMap", v.ConfigMap.Name)
		case v.Secret != nil:
			add("Secret", v.Secret.SecretName)
		case v.Projected != nil:
			for _, s := range v.Projected.Sources {
				if s.ConfigMap != nil {
					add("ConfigMap", s.ConfigMap.Name)
				}
				if s.Secret != nil {
					add("Secret", s.Secret.Name)
				}
			}
		}
	}
	for _, cs := range [][]corev1.Container{pod.Spec.InitContainers, pod.Spec.Containers} {
		for _, c := range cs {
			for _, f := range c.EnvFrom {
				if f.ConfigMapRef != nil {
					add("ConfigMap", f.ConfigMapRef.Name)
				}
				if f.SecretRef != nil {
					add("Secret", f.SecretRef.Name)
				}
			}
			for _, e := range c.Env {
				if e.ValueFrom == nil {
					continue
				}
				if r := e.ValueFrom.ConfigMapKeyRef; r != nil {
					add("ConfigMap", r.Name)
				}
				if r := e.ValueFrom.SecretKeyRef; r != nil {
					add("Secret", r.Name)
				}
			}
		}
	}
	return out
}
