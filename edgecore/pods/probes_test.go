package pods

import (
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

func TestResolveProbeTarget(t *testing.T) {
	c := &corev1.Container{
		Name:  "web",
		Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}, {Name: "admin", ContainerPort: 9090}},
		Env: []corev1.EnvVar{{Name: "FILE", Value: "/tmp/ready"},
			{Name: "FROM", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}}},
	}
	httpGet := func(p intstr.IntOrString) *corev1.Probe {
		return &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Port: p}}}
	}
	tcp := func(p intstr.IntOrString) *corev1.Probe {
		return &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: p}}}
	}
	for _, tc := range []struct {
		name    string
		probe   *corev1.Probe
		want    probeTarget
		wantErr string
	}{
		{name: "number", probe: httpGet(intstr.FromInt32(80)), want: probeTarget{port: "80"}},
		{name: "named http", probe: httpGet(intstr.FromString("http")), want: probeTarget{port: "8080"}},
		{name: "named tcp", probe: tcp(intstr.FromString("admin")), want: probeTarget{port: "9090"}},
		{name: "number as a string", probe: tcp(intstr.FromString("7070")), want: probeTarget{port: "7070"}},
		{name: "unknown name", probe: httpGet(intstr.FromString("metrics")),
			wantErr: `port "metrics": container web has no port of that name`},
		{name: "zero", probe: tcp(intstr.FromInt32(0)), wantErr: "port 0: not a port number (1-65535)"},
		{name: "too large", probe: tcp(intstr.FromString("70000")), wantErr: "port 70000: not a port number (1-65535)"},
		{name: "exec expands static env", probe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{Exec: &corev1.ExecAction{
			Command: []string{"cat", "$(FILE)", "$(FROM)", "$$(FILE)", "$(NONE)"}}}},
			want: probeTarget{command: []string{"cat", "/tmp/ready", "", "$(FILE)", "$(NONE)"}}},
		{name: "grpc", probe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{GRPC: &corev1.GRPCAction{Port: 1}}},
			wantErr: "grpc probes are not supported"},
		{name: "no handler", probe: &corev1.Probe{}, wantErr: "the probe has no handler"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := resolveTarget(tc.probe, c)
			if tc.wantErr != "" {
				require.EqualError(t, got.err, tc.wantErr)
				return
			}
			require.NoError(t, got.err)
			require.Equal(t, tc.want, got)
		})
	}
}

// A probe on a named port reaches that port; a probe on a name the
// container lacks fails, on every run, with the reason, and track reports
// it once.
func TestNamedPortProbe(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/healthz" {
			w.WriteHeader(http.StatusNotFound)
		}
	}))
	defer srv.Close()
	_, portStr, err := net.SplitHostPort(srv.Listener.Addr().String())
	require.NoError(t, err)
	port, err := strconv.Atoi(portStr)
	require.NoError(t, err)

	m := &Manager{httpProbe: srv.Client()}
	c := &corev1.Container{Name: "web", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: int32(port)}},
		ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{
			Path: "/healthz", Port: intstr.FromString("http")}}},
		LivenessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{
			Port: intstr.FromString("metrics")}}},
	}
	p := prober{entries: map[string]*probeEntry{}}
	now := time.Unix(1000, 0)
	err = p.track("ns/pod", "c1", "127.0.0.1", c, now)
	require.EqualError(t, err, `liveness probe: port "metrics": container web has no port of that name`)
	require.NoError(t, p.track("ns/pod", "c1", "127.0.0.1", c, now), "reported once, when first tracked")

	runs := p.due(now)
	require.Len(t, runs, 2)
	for _, r := range runs {
		err := m.runProbe(t.Context(), r)
		switch r.kind {
		case readinessProbe:
			require.NoError(t, err, "the named port http is the server's")
		case livenessProbe:
			require.EqualError(t, err, `port "metrics": container web has no port of that name`)
		}
		p.record(r, err == nil, now)
	}
	res, _ := p.result("c1")
	require.True(t, res.ready)
	require.Equal(t, "liveness", res.failed, "an unknown port fails the probe, it does not panic")

	// A wrong path on the named port is a failure with the status.
	c.ReadinessProbe.HTTPGet.Path = "/nope"
	target := resolveTarget(c.ReadinessProbe, c)
	err = m.runProbe(t.Context(), probeRun{id: "c1", host: "127.0.0.1", kind: readinessProbe, probe: c.ReadinessProbe, target: target})
	require.ErrorContains(t, err, "status 404")
}
