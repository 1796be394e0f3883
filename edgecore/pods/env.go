package pods

import (
	"fmt"
	"slices"
	"strings"
	"unicode/utf8"

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
// container waits with CreateContainerConfigError). $(VAR) references in
// env values are expanded against the variables set before them (envFrom
// and earlier env entries), as kubelet does; values from envFrom and
// valueFrom are taken as they are.
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
			set(e.Name, expand(e.Value, vals))
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
		case "spec.nodeName":
			return facts.node, true, nil
		case "spec.serviceAccountName":
			return pod.Spec.ServiceAccountName, true, nil
		case "status.podIP":
			return facts.podIP, true, nil
		case "status.hostIP":
			return facts.hostIP, true, nil
		}
		// metadata.name, namespace, uid, and one label or annotation by
		// key; not the whole label or annotation maps (only volumes take
		// those).
		v, err := podField(pod, from.FieldRef.FieldPath, false)
		return v, err == nil, err
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

// expandCommand expands $(VAR) in c's command and args against the
// container's resolved environment, as kubelet does before it creates the
// container.
func expandCommand(c *corev1.Container, env []*runtimeapi.KeyValue) (command, args []string) {
	vars := make(map[string]string, len(env))
	for _, kv := range env {
		vars[kv.GetKey()] = string(kv.GetValue())
	}
	return expandAll(c.Command, vars), expandAll(c.Args, vars)
}

// staticEnv maps the names of c's env entries to their plain values (""
// for those with a valueFrom): what kubelet expands an exec probe's
// command against.
func staticEnv(c *corev1.Container) map[string]string {
	vars := make(map[string]string, len(c.Env))
	for _, e := range c.Env {
		vars[e.Name] = e.Value
	}
	return vars
}

// expandSubPath expands a volumeMount's subPathExpr against env, as
// kubelet's ExpandContainerVolumeMounts: a name that is not set, or set
// to "", is an error rather than left as written.
func expandSubPath(expr string, env []*runtimeapi.KeyValue) (string, error) {
	vars := make(map[string]string, len(env))
	for _, kv := range env {
		if len(kv.GetValue()) > 0 {
			vars[kv.GetKey()] = string(kv.GetValue())
		}
	}
	var missing []string
	for name := range references(expr) {
		if _, ok := vars[name]; !ok {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		slices.Sort(missing)
		return "", fmt.Errorf("missing value for %s", strings.Join(missing, ", "))
	}
	return expand(expr, vars), nil
}

// references are the names s refers to with $(NAME), escapes skipped.
func references(s string) map[string]bool {
	names := map[string]bool{}
	for i := 0; i < len(s)-1; i++ {
		if s[i] != '$' {
			continue
		}
		switch s[i+1] {
		case '$':
			i++ // an escaped $
		case '(':
			if end := strings.IndexByte(s[i+2:], ')'); end >= 0 {
				names[s[i+2:i+2+end]] = true
				i += 2 + end
			}
		}
	}
	return names
}

func expandAll(in []string, vars map[string]string) []string {
	if in == nil {
		return nil
	}
	out := make([]string, len(in))
	for i, s := range in {
		out[i] = expand(s, vars)
	}
	return out
}

// expand replaces each $(NAME) in s with the value of NAME in vars, with
// the rules of kubelet's expansion package
// (k8s.io/kubernetes/third_party/forked/golang/expansion):
//
//   - $$ is an escaped $: "$$(A)" gives "$(A)", unexpanded;
//   - $(NAME) of a name vars lacks stays as written;
//   - a $( without a closing ) stays as written;
//   - a $ followed by anything else, or at the end, stays as written.
//
// Names are not checked: whatever lies between the parentheses is looked
// up. Cost: one pass over s.
func expand(s string, vars map[string]string) string {
	i := strings.IndexByte(s, '$')
	if i < 0 {
		return s
	}
	var b strings.Builder
	b.Grow(len(s))
	for i >= 0 {
		b.WriteString(s[:i])
		rest := s[i+1:]
		switch {
		case rest == "":
			b.WriteByte('$')
			s = ""
		case rest[0] == '$':
			b.WriteByte('$')
			s = rest[1:]
		case rest[0] == '(':
			end := strings.IndexByte(rest, ')')
			if end < 0 {
				// No reference can complete; escapes further on still
				// apply.
				b.WriteString("$(")
				s = rest[1:]
				break
			}
			name := rest[1:end]
			if v, ok := vars[name]; ok {
				b.WriteString(v)
			} else {
				b.WriteString(s[i : i+1+end+1])
			}
			s = rest[end+1:]
		default:
			// Not a reference: the $ and the rune after it stay.
			_, size := utf8.DecodeRuneInString(rest)
			b.WriteString(s[i : i+1+size])
			s = rest[size:]
		}
		i = strings.IndexByte(s, '$')
	}
	b.WriteString(s)
	return b.String()
}
