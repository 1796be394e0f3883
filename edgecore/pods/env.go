package pods

import (
	"fmt"

	corev1 "k8s.io/api/core/v1"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// lookupFunc returns the data of the ConfigMap or Secret (kind) name in the
// pod's namespace; ok is false when there is none.
type lookupFunc func(kind, name string) (data map[string]string, ok bool, err error)

// envFacts are the values fieldRefs resolve to.
type envFacts struct {
	podIP, hostIP, node string
}

// resolveEnv returns container c's environment: envFrom first, in order,
// then env, a later name replacing an earlier one, as kubelet does. A
// missing ConfigMap, Secret or key that is not optional is an error (the
// container waits with CreateContainerConfigError). $(VAR) references are
// not expanded.
func resolveEnv(pod *corev1.Pod, c *corev1.Container, facts envFacts, lookup lookupFunc) ([]*runtimeapi.KeyValue, error) {
	var order []string
	vals := map[string]string{}
	set := func(k, v string) {
		if _, ok := vals[k]; !ok {
			order = append(order, k)
		}
		vals[k] = v
	}
	for _, from := range c.EnvFrom {
		kind, name, optional := "", "", false
		switch {
		case from.ConfigMapRef != nil:
			kind, name, optional = "ConfigMap", from.ConfigMapRef.Name, isTrue(from.ConfigMapRef.Optional)
		case from.SecretRef != nil:
			kind, name, optional = "Secret", from.SecretRef.Name, isTrue(from.SecretRef.Optional)
		default:
			continue
		}
		data, ok, err := lookup(kind, name)
		if err != nil {
			return nil, err
		}
		if !ok {
			if optional {
				continue
			}
			return nil, fmt.Errorf("%s %q not found", kind, name)
		}
		for k, v := range data {
			set(from.Prefix+k, v)
		}
	}
	for _, e := range c.Env {
		if e.ValueFrom == nil {
			set(e.Name, e.Value)
			continue
		}
		v, ok, err := valueFrom(pod, e.ValueFrom, facts, lookup)
		if err != nil {
			return nil, fmt.Errorf("env %s: %w", e.Name, err)
		}
		if ok {
			set(e.Name, v)
		}
	}
	out := make([]*runtimeapi.KeyValue, 0, len(order))
	for _, k := range order {
		out = append(out, &runtimeapi.KeyValue{Key: k, Value: []byte(vals[k])})
	}
	return out, nil
}

func valueFrom(pod *corev1.Pod, from *corev1.EnvVarSource, facts envFacts, lookup lookupFunc) (string, bool, error) {
	keyRef := func(kind, name, key string, optional bool) (string, bool, error) {
		data, ok, err := lookup(kind, name)
		if err != nil {
			return "", false, err
		}
		if !ok {
			if optional {
				return "", false, nil
			}
			return "", false, fmt.Errorf("%s %q not found", kind, name)
		}
		v, ok := data[key]
		if !ok && !optional {
			return "", false, fmt.Errorf("key %q not found in %s %q", key, kind, name)
		}
		return v, ok, nil
	}
	switch {
	case from.FieldRef != nil:
		switch from.FieldRef.FieldPath {
		case "metadata.name":
			return pod.Name, true, nil
		case "metadata.namespace":
			return pod.Namespace, true, nil
		case "metadata.uid":
			return string(pod.UID), true, nil
		case "spec.nodeName":
			return facts.node, true, nil
		case "spec.serviceAccountName":
			return pod.Spec.ServiceAccountName, true, nil
		case "status.podIP":
			return facts.podIP, true, nil
		case "status.hostIP":
			return facts.hostIP, true, nil
		}
		return "", false, fmt.Errorf("fieldRef %q is not supported", from.FieldRef.FieldPath)
	case from.ConfigMapKeyRef != nil:
		r := from.ConfigMapKeyRef
		return keyRef("ConfigMap", r.Name, r.Key, isTrue(r.Optional))
	case from.SecretKeyRef != nil:
		r := from.SecretKeyRef
		return keyRef("Secret", r.Name, r.Key, isTrue(r.Optional))
	}
	return "", false, fmt.Errorf("only fieldRef, configMapKeyRef and secretKeyRef are supported")
}

func isTrue(b *bool) bool { return b != nil && *b }
