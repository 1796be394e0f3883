package main

import (
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes/scheme"
)

// deployDir holds the manifests this test checks.
var deployDir = filepath.Join("..", "..", "..", "build", "deploy")

// decodeStrict decodes one manifest with client-go's scheme, refusing
// unknown and duplicate fields, into want's type.
func decodeStrict[T runtime.Object](t *testing.T, file string, want T) T {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(deployDir, file))
	require.NoError(t, err)
	codecs := serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict)
	obj, _, err := codecs.UniversalDeserializer().Decode(b, nil, nil)
	require.NoError(t, err, "%s decodes strictly", file)
	got, ok := obj.(T)
	require.True(t, ok, "%s holds a %T, want %T", file, obj, want)
	return got
}

// TestDeployManifests: build/deploy's Deployment, Service and
// PodDisruptionBudget decode strictly; the Deployment's arguments are
// flags of this binary that parse; the ports it listens on are the
// container ports the probes and the Service name, with the right
// protocols; the Service and the budget select the Deployment's pods.
func TestDeployManifests(t *testing.T) {
	d := decodeStrict(t, "deployment.yaml", &appsv1.Deployment{})
	svc := decodeStrict(t, "service.yaml", &corev1.Service{})
	pdb := decodeStrict(t, "pdb.yaml", &policyv1.PodDisruptionBudget{})

	require.Equal(t, "tether-system", d.Namespace)
	require.Equal(t, "tether-system", svc.Namespace)
	require.Equal(t, "tether-system", pdb.Namespace)
	require.Equal(t, int32(3), *d.Spec.Replicas)
	pod := d.Spec.Template
	require.Equal(t, "tether-cloudcore", pod.Spec.ServiceAccountName, "the ServiceAccount of build/deploy/rbac.yaml")
	require.NotNil(t, pod.Spec.Affinity)
	require.NotNil(t, pod.Spec.Affinity.PodAntiAffinity)
	anti := pod.Spec.Affinity.PodAntiAffinity.RequiredDuringSchedulingIgnoredDuringExecution
	require.Len(t, anti, 1)
	require.Equal(t, "kubernetes.io/hostname", anti[0].TopologyKey)
	podLabels := labels.Set(pod.Labels)
	for what, sel := range map[string]map[string]string{
		"deployment selector": d.Spec.Selector.MatchLabels,
		"anti-affinity":       anti[0].LabelSelector.MatchLabels,
		"service selector":    svc.Spec.Selector,
		"budget selector":     pdb.Spec.Selector.MatchLabels,
	} {
		require.NotEmpty(t, sel, what)
		require.True(t, labels.SelectorFromSet(sel).Matches(podLabels), "%s %v selects the pods %v", what, sel, pod.Labels)
	}
	require.Equal(t, intstr.FromInt32(2), *pdb.Spec.MinAvailable, "one replica of three may be disrupted")

	require.Len(t, pod.Spec.Containers, 1)
	c := pod.Spec.Containers[0]
	root := newRootCommand()
	require.NoError(t, root.ParseFlags(c.Args), "the Deployment's arguments are cloudcore's flags")
	for _, a := range c.Args {
		name, _, _ := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		require.True(t, root.Flags().Changed(name), "argument %q sets a flag", a)
	}
	port := func(flag string) int32 {
		v, err := root.Flags().GetString(flag)
		require.NoError(t, err)
		_, p, err := net.SplitHostPort(v)
		require.NoError(t, err, "--%s=%s", flag, v)
		n, err := net.LookupPort("tcp", p)
		require.NoError(t, err)
		return int32(n)
	}
	host := func(flag string) string {
		v, _ := root.Flags().GetString(flag)
		h, _, _ := net.SplitHostPort(v)
		return h
	}
	require.NotEqual(t, "127.0.0.1", host("metrics-addr"), "the kubelet probes the pod IP: the operations endpoint must not be local only")
	// Every port CloudCore listens on, by the name the manifests use.
	listens := map[string]corev1.ContainerPort{
		"quic":      {ContainerPort: port("quic-addr"), Protocol: corev1.ProtocolUDP},
		"websocket": {ContainerPort: port("websocket-addr"), Protocol: corev1.ProtocolTCP},
		"join":      {ContainerPort: port("join-addr"), Protocol: corev1.ProtocolTCP},
		"metrics":   {ContainerPort: port("metrics-addr"), Protocol: corev1.ProtocolTCP},
	}
	require.Len(t, c.Ports, len(listens))
	for _, p := range c.Ports {
		want, ok := listens[p.Name]
		require.True(t, ok, "container port %q is one CloudCore listens on", p.Name)
		require.Equal(t, want.ContainerPort, p.ContainerPort, "container port %q", p.Name)
		require.Equal(t, want.Protocol, p.Protocol, "container port %q", p.Name)
	}
	for name, probe := range map[string]*corev1.Probe{"/readyz": c.ReadinessProbe, "/livez": c.LivenessProbe} {
		require.NotNil(t, probe, name)
		require.NotNil(t, probe.HTTPGet, name)
		require.Equal(t, name, probe.HTTPGet.Path)
		require.Equal(t, intstr.FromString("metrics"), probe.HTTPGet.Port, "%s probes the operations endpoint", name)
	}

	// The Service carries the tunnel on UDP and TCP and the join port,
	// to the container ports of those names, and not the metrics.
	var names []string
	for _, p := range svc.Spec.Ports {
		names = append(names, p.Name)
		want, ok := listens[p.TargetPort.StrVal]
		require.True(t, ok, "service port %q targets a named container port", p.Name)
		require.Equal(t, want.Protocol, p.Protocol, "service port %q", p.Name)
		require.Equal(t, want.ContainerPort, p.Port, "service port %q is the port edges are given", p.Name)
	}
	slices.Sort(names)
	require.Equal(t, []string{"join", "quic", "websocket"}, names)
}
