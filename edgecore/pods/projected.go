package pods

import (
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
)

// The files of projected and downwardAPI volumes, as kubelet computes them
// (pkg/volume/projected, pkg/volume/downwardapi, pkg/fieldpath,
// pkg/api/v1/resource). Pure functions: the manager writes what they
// return with writeAtomic.

// tokenFunc returns the service-account token of a serviceAccountToken
// source (tokens.go).
type tokenFunc func(src *corev1.ServiceAccountTokenProjection) (string, error)

// projectedFiles are the files of a projected volume: each source's, in
// order, with the volume's defaultMode unless an item names its own. Two
// sources may not write the same path. A ConfigMap or Secret source that
// is missing (or lacks a key) and is not optional is an error, and so is
// a serviceAccountToken source without a token (token nil: none can be
// had).
func projectedFiles(pod *corev1.Pod, src *corev1.ProjectedVolumeSource, allocatable corev1.ResourceList, lookup lookupFunc, token tokenFunc) (map[string]volumeFile, error) {
	files := map[string]volumeFile{}
	for i, s := range src.Sources {
		var part map[string]volumeFile
		var err error
		switch {
		case s.ConfigMap != nil:
			part, err = objectFiles("ConfigMap", s.ConfigMap.Name, s.ConfigMap.Items, src.DefaultMode, isTrue(s.ConfigMap.Optional), lookup)
		case s.Secret != nil:
			part, err = objectFiles("Secret", s.Secret.Name, s.Secret.Items, src.DefaultMode, isTrue(s.Secret.Optional), lookup)
		case s.DownwardAPI != nil:
			part, err = downwardFiles(pod, s.DownwardAPI.Items, src.DefaultMode, allocatable)
		case s.ServiceAccountToken != nil:
			part, err = tokenFiles(s.ServiceAccountToken, src.DefaultMode, token)
		default:
			err = errors.New("only configMap, secret, downwardAPI and serviceAccountToken sources are supported")
		}
		if err != nil {
			return nil, fmt.Errorf("source %d: %w", i, err)
		}
		for p, f := range part {
			if _, dup := files[p]; dup {
				return nil, fmt.Errorf("source %d: path %q is projected twice", i, p)
			}
			files[p] = f
		}
	}
	return files, nil
}

// tokenFiles is the one file of a serviceAccountToken source: the token,
// with the volume's defaultMode, as kubelet writes it.
func tokenFiles(src *corev1.ServiceAccountTokenProjection, defaultMode *int32, token tokenFunc) (map[string]volumeFile, error) {
	if err := checkPath(src.Path); err != nil {
		return nil, err
	}
	if token == nil {
		return nil, errNoTokens
	}
	tok, err := token(src)
	if err != nil {
		return nil, fmt.Errorf("serviceAccountToken %q: %w", src.Path, err)
	}
	return map[string]volumeFile{filepath.Clean(src.Path): {data: []byte(tok), mode: fileMode(defaultMode)}}, nil
}

// objectFiles are the files of a ConfigMap or Secret; a missing optional
// object gives none.
func objectFiles(kind, name string, items []corev1.KeyToPath, defaultMode *int32, optional bool, lookup lookupFunc) (map[string]volumeFile, error) {
	data, ok, err := lookup(kind, name)
	if err != nil {
		return nil, err
	}
	if !ok && !optional {
		return nil, fmt.Errorf("%s %q not found", kind, name)
	}
	files, err := volumeFiles(data, items, defaultMode, optional)
	if err != nil {
		return nil, fmt.Errorf("%s %q: %w", kind, name, err)
	}
	return files, nil
}

// downwardFiles are the files of downwardAPI items: a pod field
// (metadata.name, namespace, uid, labels, annotations, or one label or
// annotation by key) or a container's resource (limits or requests of
// cpu, memory or ephemeral-storage, in units of the divisor, rounded up).
func downwardFiles(pod *corev1.Pod, items []corev1.DownwardAPIVolumeFile, defaultMode *int32, allocatable corev1.ResourceList) (map[string]volumeFile, error) {
	mode := fileMode(defaultMode)
	files := make(map[string]volumeFile, len(items))
	for _, it := range items {
		if err := checkPath(it.Path); err != nil {
			return nil, err
		}
		var v string
		var err error
		switch {
		case it.FieldRef != nil:
			v, err = podField(pod, it.FieldRef.FieldPath, true)
		case it.ResourceFieldRef != nil:
			v, err = containerResource(pod, it.ResourceFieldRef, allocatable)
		default:
			err = errors.New("a fieldRef or resourceFieldRef is required")
		}
		if err != nil {
			return nil, fmt.Errorf("item %q: %w", it.Path, err)
		}
		m := mode
		if it.Mode != nil {
			m = fileMode(it.Mode)
		}
		files[filepath.Clean(it.Path)] = volumeFile{data: []byte(v), mode: m}
	}
	return files, nil
}

// fileMode is a volume file's mode: mode's permission bits, 0644 without
// one (the API server's default).
func fileMode(mode *int32) os.FileMode {
	if mode == nil {
		return 0o644
	}
	return os.FileMode(*mode) & os.ModePerm
}

// podField is the value of a pod field path. metadata.labels and
// metadata.annotations whole (allowed only when whole is set: in
// downwardAPI volumes, not in env) are key="value" lines sorted by key,
// the value quoted as Go quotes it, as kubelet's fieldpath.FormatMap;
// metadata.labels['key'] is one value ("" when absent).
func podField(pod *corev1.Pod, path string, whole bool) (string, error) {
	if field, key, ok := subscripted(path); ok {
		switch field {
		case "metadata.labels":
			return pod.Labels[key], nil
		case "metadata.annotations":
			return pod.Annotations[key], nil
		}
		return "", fmt.Errorf("fieldRef %q: only metadata.labels and metadata.annotations take a key", path)
	}
	switch path {
	case "metadata.name":
		return pod.Name, nil
	case "metadata.namespace":
		return pod.Namespace, nil
	case "metadata.uid":
		return string(pod.UID), nil
	case "metadata.labels":
		if whole {
			return formatMap(pod.Labels), nil
		}
	case "metadata.annotations":
		if whole {
			return formatMap(pod.Annotations), nil
		}
	}
	return "", fmt.Errorf("fieldRef %q is not supported", path)
}

// subscripted splits "metadata.labels['key']" into its field and key.
func subscripted(path string) (field, key string, ok bool) {
	rest, found := strings.CutSuffix(path, "']")
	if !found {
		return "", "", false
	}
	field, key, found = strings.Cut(rest, "['")
	return field, key, found && field != ""
}

func formatMap(m map[string]string) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var b []byte
	for i, k := range keys {
		if i > 0 {
			b = append(b, '\n')
		}
		b = append(b, k...)
		b = append(b, '=')
		b = strconv.AppendQuote(b, m[k])
	}
	return string(b)
}

// containerResource is a container's limit or request in units of the
// divisor (default 1), rounded up. A limit the container does not set is
// the node's allocatable, as kubelet reports it (0 when the manager was
// given no Allocatable).
func containerResource(pod *corev1.Pod, ref *corev1.ResourceFieldSelector, allocatable corev1.ResourceList) (string, error) {
	var c *corev1.Container
	for _, x := range slices.Concat(pod.Spec.Containers, pod.Spec.InitContainers) {
		if x.Name == ref.ContainerName {
			c = &x
			break
		}
	}
	if c == nil {
		return "", fmt.Errorf("resourceFieldRef: no container %q in the pod", ref.ContainerName)
	}
	kind, name, _ := strings.Cut(ref.Resource, ".")
	res := corev1.ResourceName(name)
	switch res {
	case corev1.ResourceCPU, corev1.ResourceMemory, corev1.ResourceEphemeralStorage:
	default:
		return "", fmt.Errorf("resourceFieldRef %q is not supported", ref.Resource)
	}
	var q resource.Quantity
	switch kind {
	case "limits":
		var ok bool
		if q, ok = c.Resources.Limits[res]; !ok {
			q = allocatable[res]
		}
	case "requests":
		q = c.Resources.Requests[res]
	default:
		return "", fmt.Errorf("resourceFieldRef %q is not supported", ref.Resource)
	}
	divisor := ref.Divisor
	if divisor.IsZero() {
		divisor = resource.MustParse("1")
	}
	if divisor.Sign() < 0 || divisor.MilliValue() == 0 {
		return "", fmt.Errorf("resourceFieldRef %q: divisor %s is not positive", ref.Resource, divisor.String())
	}
	if res == corev1.ResourceCPU {
		return strconv.FormatInt(int64(math.Ceil(float64(q.MilliValue())/float64(divisor.MilliValue()))), 10), nil
	}
	return strconv.FormatInt(int64(math.Ceil(float64(q.Value())/float64(divisor.Value()))), 10), nil
}
