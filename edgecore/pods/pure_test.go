package pods

import (
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

func TestBackoffDelay(t *testing.T) {
	b := backoff{base: 10 * time.Second, max: 5 * time.Minute, reset: 10 * time.Minute}
	for _, tc := range []struct {
		name      string
		step      int
		ranFor    time.Duration
		wantDelay time.Duration
		wantNext  int
	}{
		{"first exit", 0, time.Second, 10 * time.Second, 1},
		{"second", 1, time.Second, 20 * time.Second, 2},
		{"third", 2, 0, 40 * time.Second, 3},
		{"capped", 5, time.Second, 5 * time.Minute, 6},
		{"stays capped", 60, time.Second, 5 * time.Minute, 61},
		{"reset after 10m running", 7, 10 * time.Minute, 10 * time.Second, 1},
		{"just under the reset", 3, 10*time.Minute - time.Second, 80 * time.Second, 4},
		{"bad annotation", -4, time.Second, 10 * time.Second, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, next := b.delay(tc.step, tc.ranFor)
			require.Equal(t, tc.wantDelay, d)
			require.Equal(t, tc.wantNext, next)
		})
	}
}

func TestLinuxResources(t *testing.T) {
	q := resource.MustParse
	for _, tc := range []struct {
		name     string
		req, lim corev1.ResourceList
		want     *runtimeapi.LinuxContainerResources
	}{
		{"best effort", nil, nil, &runtimeapi.LinuxContainerResources{CpuShares: 2}},
		{"request only", corev1.ResourceList{corev1.ResourceCPU: q("250m")}, nil,
			&runtimeapi.LinuxContainerResources{CpuShares: 256}},
		{"tiny request", corev1.ResourceList{corev1.ResourceCPU: q("1m")}, nil,
			&runtimeapi.LinuxContainerResources{CpuShares: 2}},
		{"limit is the request", nil, corev1.ResourceList{corev1.ResourceCPU: q("2"), corev1.ResourceMemory: q("64Mi")},
			&runtimeapi.LinuxContainerResources{CpuShares: 2048, CpuPeriod: 100000, CpuQuota: 200000, MemoryLimitInBytes: 64 << 20}},
		{"request and limit", corev1.ResourceList{corev1.ResourceCPU: q("100m")}, corev1.ResourceList{corev1.ResourceCPU: q("500m")},
			&runtimeapi.LinuxContainerResources{CpuShares: 102, CpuPeriod: 100000, CpuQuota: 50000}},
		{"quota floor", nil, corev1.ResourceList{corev1.ResourceCPU: q("5m")},
			&runtimeapi.LinuxContainerResources{CpuShares: 5, CpuPeriod: 100000, CpuQuota: 1000}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &corev1.Container{Resources: corev1.ResourceRequirements{Requests: tc.req, Limits: tc.lim}}
			require.Equal(t, tc.want.String(), linuxResources(c).String())
		})
	}
}

func testPod() *corev1.Pod {
	grace := int64(7)
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "ns", UID: "u1", Labels: map[string]string{"app": "web"}},
		Spec: corev1.PodSpec{
			NodeName:                      "edge-1",
			TerminationGracePeriodSeconds: &grace,
			SecurityContext:               &corev1.PodSecurityContext{RunAsUser: ptr(int64(1000))},
			Containers: []corev1.Container{{
				Name: "app", Image: "img:1", Command: []string{"sh"}, Args: []string{"-c", "x"}, WorkingDir: "/w",
				Ports: []corev1.ContainerPort{{ContainerPort: 80, HostPort: 8080}, {ContainerPort: 53, Protocol: corev1.ProtocolUDP}},
				SecurityContext: &corev1.SecurityContext{
					Privileged: ptr(true), ReadOnlyRootFilesystem: ptr(true), RunAsUser: ptr(int64(0)),
					Capabilities: &corev1.Capabilities{Add: []corev1.Capability{"NET_ADMIN"}, Drop: []corev1.Capability{"ALL"}},
				},
			}},
		},
	}
}

func TestContainerConfig(t *testing.T) {
	pod := testPod()
	env := []*runtimeapi.KeyValue{{Key: "A", Value: []byte("1")}}
	got := containerConfig(pod, &pod.Spec.Containers[0], 3, 2, env)
	want := &runtimeapi.ContainerConfig{
		Metadata: &runtimeapi.ContainerMetadata{Name: "app", Attempt: 3},
		Image:    &runtimeapi.ImageSpec{Image: "img:1", UserSpecifiedImage: "img:1"},
		Command:  []string{"sh"}, Args: []string{"-c", "x"}, WorkingDir: "/w", Envs: env,
		Labels: map[string]string{
			labelPodName: "web", labelPodNamespace: "ns", labelPodUID: "u1", labelContainerName: "app",
		},
		Annotations: map[string]string{annotationRestartCount: "3", annotationGracePeriod: "7", annotationBackoffStep: "2",
			annotationSpecHash: specHash(&pod.Spec.Containers[0])},
		LogPath: "app_3.log",
		Linux: &runtimeapi.LinuxContainerConfig{
			Resources: &runtimeapi.LinuxContainerResources{CpuShares: 2},
			SecurityContext: &runtimeapi.LinuxContainerSecurityContext{
				NamespaceOptions: &runtimeapi.NamespaceOption{
					Network: runtimeapi.NamespaceMode_POD, Pid: runtimeapi.NamespaceMode_CONTAINER, Ipc: runtimeapi.NamespaceMode_POD,
				},
				RunAsUser:  &runtimeapi.Int64Value{Value: 0},
				Privileged: true, ReadonlyRootfs: true,
				Capabilities: &runtimeapi.Capability{AddCapabilities: []string{"NET_ADMIN"}, DropCapabilities: []string{"ALL"}},
			},
		},
	}
	require.Equal(t, want.String(), got.String())

	pod.Spec.Containers[0].SecurityContext = nil
	pod.Spec.HostNetwork = true
	sc := containerConfig(pod, &pod.Spec.Containers[0], 0, 0, nil).Linux.SecurityContext
	require.Equal(t, int64(1000), sc.RunAsUser.Value, "the pod's runAsUser applies")
	require.Equal(t, runtimeapi.NamespaceMode_NODE, sc.NamespaceOptions.Network)
}

func TestSandboxConfig(t *testing.T) {
	pod := testPod()
	sb := sandboxConfig(pod, 1, "/logs")
	require.Equal(t, "/logs/ns_web_u1", sb.LogDirectory)
	require.Equal(t, "web", sb.Hostname)
	require.Equal(t, uint32(1), sb.Metadata.Attempt)
	require.Equal(t, "web", sb.Labels["app"])
	require.Equal(t, "u1", sb.Labels[labelPodUID])
	require.True(t, sb.Linux.SecurityContext.Privileged, "a privileged container needs a privileged sandbox")
	require.Len(t, sb.PortMappings, 1)
	require.Equal(t, int32(8080), sb.PortMappings[0].HostPort)

	pod.Spec.HostNetwork = true
	sb = sandboxConfig(pod, 0, "/logs")
	require.Empty(t, sb.Hostname)
	require.Equal(t, runtimeapi.NamespaceMode_NODE, sb.Linux.SecurityContext.NamespaceOptions.Network)
}

func TestResolveEnv(t *testing.T) {
	objects := map[string]map[string]string{
		"ConfigMap/cfg": {"mode": "fast", "level": "3"},
		"Secret/creds":  {"token": "s3cret"},
	}
	lookup := func(kind, name string) (map[string]string, bool, error) {
		if name == "broken" {
			return nil, false, errors.New("disk on fire")
		}
		d, ok := objects[kind+"/"+name]
		return d, ok, nil
	}
	facts := envFacts{podIP: "10.0.0.5", hostIP: "192.0.2.1", node: "edge-1"}
	field := func(path string) *corev1.EnvVarSource {
		return &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: path}}
	}
	secretKey := func(name, key string, optional bool) *corev1.EnvVarSource {
		return &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{
			LocalObjectReference: corev1.LocalObjectReference{Name: name}, Key: key, Optional: &optional}}
	}
	for _, tc := range []struct {
		name    string
		c       corev1.Container
		want    map[string]string
		wantErr string
	}{
		{name: "values and fields", c: corev1.Container{Env: []corev1.EnvVar{
			{Name: "A", Value: "1"}, {Name: "N", ValueFrom: field("metadata.name")},
			{Name: "NS", ValueFrom: field("metadata.namespace")}, {Name: "IP", ValueFrom: field("status.podIP")},
			{Name: "HOST", ValueFrom: field("status.hostIP")}, {Name: "NODE", ValueFrom: field("spec.nodeName")},
		}}, want: map[string]string{"A": "1", "N": "web", "NS": "ns", "IP": "10.0.0.5", "HOST": "192.0.2.1", "NODE": "edge-1"}},
		{name: "secret key", c: corev1.Container{Env: []corev1.EnvVar{{Name: "T", ValueFrom: secretKey("creds", "token", false)}}},
			want: map[string]string{"T": "s3cret"}},
		{name: "missing key", c: corev1.Container{Env: []corev1.EnvVar{{Name: "T", ValueFrom: secretKey("creds", "nope", false)}}},
			wantErr: `env T: key "nope" not found in Secret "creds"`},
		{name: "missing optional", c: corev1.Container{Env: []corev1.EnvVar{{Name: "T", ValueFrom: secretKey("other", "x", true)}}},
			want: map[string]string{}},
		{name: "missing secret", c: corev1.Container{Env: []corev1.EnvVar{{Name: "T", ValueFrom: secretKey("other", "x", false)}}},
			wantErr: `env T: Secret "other" not found`},
		{name: "store error", c: corev1.Container{Env: []corev1.EnvVar{{Name: "T", ValueFrom: secretKey("broken", "x", true)}}},
			wantErr: "env T: disk on fire"},
		{name: "envFrom then env", c: corev1.Container{
			EnvFrom: []corev1.EnvFromSource{
				{ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "cfg"}}},
				{Prefix: "S_", SecretRef: &corev1.SecretEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "creds"}}},
			},
			Env: []corev1.EnvVar{{Name: "mode", Value: "slow"}},
		}, want: map[string]string{"mode": "slow", "level": "3", "S_token": "s3cret"}},
		{name: "unsupported field", c: corev1.Container{Env: []corev1.EnvVar{{Name: "X", ValueFrom: field("metadata.labels")}}},
			wantErr: `env X: fieldRef "metadata.labels" is not supported`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kvs, err := resolveEnv(testPod(), &tc.c, facts, lookup)
			if tc.wantErr != "" {
				require.EqualError(t, err, tc.wantErr)
				return
			}
			require.NoError(t, err)
			got := map[string]string{}
			for _, kv := range kvs {
				got[kv.Key] = string(kv.Value)
			}
			require.Equal(t, tc.want, got)
		})
	}
}

// instance is a CRI container status for the status tests.
func instance(name string, attempt uint32, state runtimeapi.ContainerState, exit int32, startedAt, finishedAt int64) *runtimeapi.ContainerStatus {
	return &runtimeapi.ContainerStatus{
		Id: name + "-" + string(rune('a'+attempt)), Metadata: &runtimeapi.ContainerMetadata{Name: name, Attempt: attempt},
		State: state, ExitCode: exit, StartedAt: startedAt, FinishedAt: finishedAt, ImageRef: "sha256:img",
	}
}

func TestComputeStatus(t *testing.T) {
	now := time.Unix(1_000_000, 0)
	sec := func(s int64) int64 { return time.Unix(s, 0).UnixNano() }
	const (
		running = runtimeapi.ContainerState_CONTAINER_RUNNING
		exited  = runtimeapi.ContainerState_CONTAINER_EXITED
		created = runtimeapi.ContainerState_CONTAINER_CREATED
	)
	readySandbox := &runtimeapi.PodSandboxStatus{State: runtimeapi.PodSandboxState_SANDBOX_READY,
		Network: &runtimeapi.PodSandboxNetworkStatus{Ip: "10.0.0.5", AdditionalIps: []*runtimeapi.PodIP{{Ip: "fd00::5"}}}}
	pod := func(policy corev1.RestartPolicy, inits ...string) *corev1.Pod {
		p := &corev1.Pod{Spec: corev1.PodSpec{RestartPolicy: policy, Containers: []corev1.Container{{Name: "app", Image: "img"}}}}
		for _, n := range inits {
			p.Spec.InitContainers = append(p.Spec.InitContainers, corev1.Container{Name: n, Image: "img"})
		}
		return p
	}
	type want struct {
		phase     corev1.PodPhase
		ready     bool
		initDone  bool
		state     string // running, waiting:<reason>, terminated:<code>
		restarts  int32
		lastExit  *int32
		initState []string
	}
	stateOf := func(cs corev1.ContainerStatus) string {
		switch {
		case cs.State.Running != nil:
			return "running"
		case cs.State.Terminated != nil:
			return "terminated:" + string(rune('0'+cs.State.Terminated.ExitCode))
		case cs.State.Waiting != nil:
			return "waiting:" + cs.State.Waiting.Reason
		}
		return ""
	}
	for _, tc := range []struct {
		name       string
		pod        *corev1.Pod
		sandbox    *runtimeapi.PodSandboxStatus
		containers map[string][]*runtimeapi.ContainerStatus
		waiting    map[string]waitReason
		want       want
	}{
		{name: "nothing yet", pod: pod(corev1.RestartPolicyAlways),
			want: want{phase: corev1.PodPending, initDone: true, state: "waiting:ContainerCreating"}},
		{name: "created", pod: pod(corev1.RestartPolicyAlways), sandbox: readySandbox,
			containers: map[string][]*runtimeapi.ContainerStatus{"app": {instance("app", 0, created, 0, 0, 0)}},
			want:       want{phase: corev1.PodPending, initDone: true, state: "waiting:ContainerCreating"}},
		{name: "running", pod: pod(corev1.RestartPolicyAlways), sandbox: readySandbox,
			containers: map[string][]*runtimeapi.ContainerStatus{"app": {instance("app", 0, running, 0, sec(10), 0)}},
			want:       want{phase: corev1.PodRunning, ready: true, initDone: true, state: "running"}},
		{name: "running after restarts", pod: pod(corev1.RestartPolicyAlways), sandbox: readySandbox,
			containers: map[string][]*runtimeapi.ContainerStatus{"app": {
				instance("app", 2, running, 0, sec(30), 0), instance("app", 1, exited, 1, sec(10), sec(20))}},
			want: want{phase: corev1.PodRunning, ready: true, initDone: true, state: "running", restarts: 2, lastExit: ptr(int32(1))}},
		{name: "crash loop", pod: pod(corev1.RestartPolicyOnFailure), sandbox: readySandbox,
			containers: map[string][]*runtimeapi.ContainerStatus{"app": {instance("app", 1, exited, 1, sec(10), sec(11))}},
			waiting:    map[string]waitReason{"app": {Reason: "CrashLoopBackOff", Message: "back-off 20s"}},
			want:       want{phase: corev1.PodRunning, initDone: true, state: "waiting:CrashLoopBackOff", restarts: 1, lastExit: ptr(int32(1))}},
		{name: "never failed", pod: pod(corev1.RestartPolicyNever), sandbox: readySandbox,
			containers: map[string][]*runtimeapi.ContainerStatus{"app": {instance("app", 0, exited, 3, sec(10), sec(11))}},
			want:       want{phase: corev1.PodFailed, initDone: true, state: "terminated:3"}},
		{name: "on failure succeeded", pod: pod(corev1.RestartPolicyOnFailure), sandbox: readySandbox,
			containers: map[string][]*runtimeapi.ContainerStatus{"app": {instance("app", 0, exited, 0, sec(10), sec(11))}},
			want:       want{phase: corev1.PodSucceeded, initDone: true, state: "terminated:0"}},
		{name: "always exited is running", pod: pod(corev1.RestartPolicyAlways), sandbox: readySandbox,
			containers: map[string][]*runtimeapi.ContainerStatus{"app": {instance("app", 0, exited, 0, sec(10), sec(11))}},
			want:       want{phase: corev1.PodRunning, initDone: true, state: "terminated:0"}},
		{name: "image missing", pod: pod(corev1.RestartPolicyAlways), sandbox: readySandbox,
			waiting: map[string]waitReason{"app": {Reason: "ErrImageNeverPull"}},
			want:    want{phase: corev1.PodPending, initDone: true, state: "waiting:ErrImageNeverPull"}},
		{name: "init running", pod: pod(corev1.RestartPolicyAlways, "i1", "i2"), sandbox: readySandbox,
			containers: map[string][]*runtimeapi.ContainerStatus{"i1": {instance("i1", 0, running, 0, sec(10), 0)}},
			want: want{phase: corev1.PodPending, state: "waiting:PodInitializing",
				initState: []string{"running", "waiting:PodInitializing"}}},
		{name: "init done", pod: pod(corev1.RestartPolicyAlways, "i1", "i2"), sandbox: readySandbox,
			containers: map[string][]*runtimeapi.ContainerStatus{
				"i1":  {instance("i1", 0, exited, 0, sec(10), sec(11))},
				"i2":  {instance("i2", 0, exited, 0, sec(12), sec(13))},
				"app": {instance("app", 0, running, 0, sec(14), 0)}},
			want: want{phase: corev1.PodRunning, ready: true, initDone: true, state: "running",
				initState: []string{"terminated:0", "terminated:0"}}},
		{name: "init failed never", pod: pod(corev1.RestartPolicyNever, "i1"), sandbox: readySandbox,
			containers: map[string][]*runtimeapi.ContainerStatus{"i1": {instance("i1", 0, exited, 2, sec(10), sec(11))}},
			want: want{phase: corev1.PodFailed, state: "waiting:PodInitializing",
				initState: []string{"terminated:2"}}},
		{name: "init failed on failure retries", pod: pod(corev1.RestartPolicyOnFailure, "i1"), sandbox: readySandbox,
			containers: map[string][]*runtimeapi.ContainerStatus{"i1": {instance("i1", 0, exited, 2, sec(10), sec(11))}},
			waiting:    map[string]waitReason{"i1": {Reason: "CrashLoopBackOff"}},
			want: want{phase: corev1.PodPending, state: "waiting:PodInitializing",
				initState: []string{"waiting:CrashLoopBackOff"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := computeStatus(observation{
				pod: tc.pod, sandbox: tc.sandbox, containers: tc.containers, waiting: tc.waiting,
				hostIPs: []string{"192.0.2.1"}, runtimeName: "containerd", now: now,
			})
			require.Equal(t, tc.want.phase, st.Phase)
			require.Len(t, st.ContainerStatuses, 1)
			cs := st.ContainerStatuses[0]
			require.Equal(t, tc.want.state, stateOf(cs))
			require.Equal(t, tc.want.ready, cs.Ready)
			require.Equal(t, tc.want.restarts, cs.RestartCount)
			if tc.want.lastExit != nil {
				require.NotNil(t, cs.LastTerminationState.Terminated)
				require.Equal(t, *tc.want.lastExit, cs.LastTerminationState.Terminated.ExitCode)
			} else {
				require.Nil(t, cs.LastTerminationState.Terminated)
			}
			var inits []string
			for _, ics := range st.InitContainerStatuses {
				inits = append(inits, stateOf(ics))
			}
			require.Equal(t, tc.want.initState, inits)
			conds := map[corev1.PodConditionType]corev1.ConditionStatus{}
			for _, c := range st.Conditions {
				conds[c.Type] = c.Status
				require.True(t, c.LastTransitionTime.Time.Equal(now))
			}
			b := func(v bool) corev1.ConditionStatus {
				if v {
					return corev1.ConditionTrue
				}
				return corev1.ConditionFalse
			}
			require.Equal(t, map[corev1.PodConditionType]corev1.ConditionStatus{
				corev1.PodScheduled:              corev1.ConditionTrue,
				corev1.PodReadyToStartContainers: b(tc.sandbox != nil),
				corev1.PodInitialized:            b(tc.want.initDone),
				corev1.ContainersReady:           b(tc.want.ready),
				corev1.PodReady:                  b(tc.want.ready),
			}, conds)
			require.Equal(t, "192.0.2.1", st.HostIP)
			if tc.sandbox != nil {
				require.Equal(t, "10.0.0.5", st.PodIP)
				require.Equal(t, []corev1.PodIP{{IP: "10.0.0.5"}, {IP: "fd00::5"}}, st.PodIPs)
			}
			if cs.State.Running != nil {
				require.Equal(t, "containerd://app-"+string(rune('a'+cs.RestartCount)), cs.ContainerID)
				require.Equal(t, "sha256:img", cs.ImageID)
				require.True(t, *cs.Started)
			}
		})
	}
}

// Transition times and the start time carry over from the previous status
// while a condition keeps its value.
func TestComputeStatusKeepsTimes(t *testing.T) {
	t0, t1 := time.Unix(100, 0), time.Unix(200, 0)
	p := &corev1.Pod{Spec: corev1.PodSpec{HostNetwork: true, Containers: []corev1.Container{{Name: "app"}}}}
	run := map[string][]*runtimeapi.ContainerStatus{"app": {
		instance("app", 0, runtimeapi.ContainerState_CONTAINER_RUNNING, 0, t0.UnixNano(), 0)}}
	sb := &runtimeapi.PodSandboxStatus{State: runtimeapi.PodSandboxState_SANDBOX_READY}
	first := computeStatus(observation{pod: p, sandbox: sb, containers: run, hostIPs: []string{"192.0.2.1"}, now: t0})
	require.Equal(t, "192.0.2.1", first.PodIP, "a host-network pod has the host's IP")
	second := computeStatus(observation{pod: p, prev: first, sandbox: sb, containers: run, now: t1})
	require.True(t, second.StartTime.Time.Equal(t0))
	for _, c := range second.Conditions {
		require.Truef(t, c.LastTransitionTime.Time.Equal(t0), "%s moved", c.Type)
	}
	run["app"][0].State = runtimeapi.ContainerState_CONTAINER_EXITED
	third := computeStatus(observation{pod: p, prev: second, sandbox: sb, containers: run, now: t1})
	for _, c := range third.Conditions {
		moved := c.Type == corev1.PodReady || c.Type == corev1.ContainersReady
		require.Equalf(t, moved, c.LastTransitionTime.Time.Equal(t1), "%s", c.Type)
	}
}

// The prober's thresholds and gating, without running anything.
func TestProberThresholds(t *testing.T) {
	now := time.Unix(1000, 0)
	exec := corev1.ProbeHandler{Exec: &corev1.ExecAction{Command: []string{"true"}}}
	c := &corev1.Container{
		StartupProbe:   &corev1.Probe{ProbeHandler: exec, PeriodSeconds: 1, FailureThreshold: 2},
		ReadinessProbe: &corev1.Probe{ProbeHandler: exec, PeriodSeconds: 2, SuccessThreshold: 2, FailureThreshold: 1, InitialDelaySeconds: 5},
		LivenessProbe:  &corev1.Probe{ProbeHandler: exec, PeriodSeconds: 1, FailureThreshold: 3},
	}
	p := prober{entries: map[string]*probeEntry{}}
	require.NoError(t, p.track("ns/pod", "c1", "10.0.0.5", c, now))
	kinds := func(runs []probeRun) []probeKind {
		var out []probeKind
		for _, r := range runs {
			out = append(out, r.kind)
		}
		slices.Sort(out)
		return out
	}
	// Only the startup probe runs until it succeeds.
	runs := p.due(now)
	require.Equal(t, []probeKind{startupProbe}, kinds(runs))
	require.Empty(t, p.due(now), "a running probe is not due again")
	_, changed := p.record(runs[0], true, now)
	require.True(t, changed)
	r, _ := p.result("c1")
	require.True(t, r.started)

	// Liveness runs now; readiness waits for its initial delay.
	runs = p.due(now.Add(time.Second))
	require.Equal(t, []probeKind{livenessProbe}, kinds(runs))
	for i := range 2 {
		_, changed = p.record(runs[0], false, now.Add(time.Duration(i+1)*time.Second))
		require.False(t, changed, "below the failure threshold")
		runs = p.due(now.Add(time.Duration(i+2) * time.Second))
		runs = slices.DeleteFunc(runs, func(r probeRun) bool { return r.kind != livenessProbe })
	}
	key, changed := p.record(runs[0], false, now.Add(3*time.Second))
	require.True(t, changed)
	require.Equal(t, "ns/pod", key)
	r, _ = p.result("c1")
	require.Equal(t, "liveness", r.failed)

	// Readiness needs two successes in a row.
	runs = slices.DeleteFunc(p.due(now.Add(5*time.Second)), func(r probeRun) bool { return r.kind != readinessProbe })
	require.Len(t, runs, 1)
	_, changed = p.record(runs[0], true, now.Add(5*time.Second))
	require.False(t, changed)
	runs = slices.DeleteFunc(p.due(now.Add(7*time.Second)), func(r probeRun) bool { return r.kind != readinessProbe })
	require.Len(t, runs, 1)
	_, changed = p.record(runs[0], true, now.Add(7*time.Second))
	require.True(t, changed)
	r, _ = p.result("c1")
	require.True(t, r.ready)

	p.retain("ns/pod", nil)
	_, ok := p.result("c1")
	require.False(t, ok)
}

// A running container with a readiness probe is not ready until the probe
// says so; one with a startup probe is not started.
func TestComputeStatusProbes(t *testing.T) {
	p := &corev1.Pod{Spec: corev1.PodSpec{Containers: []corev1.Container{{
		Name: "app", ReadinessProbe: &corev1.Probe{}, StartupProbe: &corev1.Probe{},
	}}}}
	run := map[string][]*runtimeapi.ContainerStatus{"app": {
		instance("app", 0, runtimeapi.ContainerState_CONTAINER_RUNNING, 0, 1, 0)}}
	sb := &runtimeapi.PodSandboxStatus{State: runtimeapi.PodSandboxState_SANDBOX_READY}
	for _, tc := range []struct {
		name           string
		probes         map[string]probeResult
		started, ready bool
	}{
		{"not tracked yet", nil, false, false},
		{"started, not ready", map[string]probeResult{"app-a": {started: true}}, true, false},
		{"ready but not started", map[string]probeResult{"app-a": {ready: true}}, false, false},
		{"started and ready", map[string]probeResult{"app-a": {started: true, ready: true}}, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := computeStatus(observation{pod: p, sandbox: sb, containers: run, probes: tc.probes, now: time.Unix(5, 0)})
			cs := st.ContainerStatuses[0]
			require.Equal(t, tc.started, *cs.Started)
			require.Equal(t, tc.ready, cs.Ready)
			require.Equal(t, corev1.PodRunning, st.Phase)
		})
	}
}

func TestVolumeFiles(t *testing.T) {
	data := map[string]string{"a": "1", "b": "2"}
	mode := int32(0o440)
	itemMode := int32(0o600)
	for _, tc := range []struct {
		name     string
		data     map[string]string
		items    []corev1.KeyToPath
		mode     *int32
		optional bool
		want     map[string]volumeFile
		wantErr  string
	}{
		{name: "all keys", data: data, want: map[string]volumeFile{"a": {[]byte("1"), 0o644}, "b": {[]byte("2"), 0o644}}},
		{name: "default mode", data: data, mode: &mode, want: map[string]volumeFile{"a": {[]byte("1"), 0o440}, "b": {[]byte("2"), 0o440}}},
		{name: "items", data: data, mode: &mode, items: []corev1.KeyToPath{{Key: "a", Path: "dir/a.txt", Mode: &itemMode}, {Key: "b", Path: "b"}},
			want: map[string]volumeFile{"dir/a.txt": {[]byte("1"), 0o600}, "b": {[]byte("2"), 0o440}}},
		{name: "missing key", data: data, items: []corev1.KeyToPath{{Key: "c", Path: "c"}}, wantErr: `key "c" not found`},
		{name: "missing optional key", data: data, optional: true, items: []corev1.KeyToPath{{Key: "c", Path: "c"}}, want: map[string]volumeFile{}},
		{name: "escape", data: data, items: []corev1.KeyToPath{{Key: "a", Path: "../../etc/passwd"}}, wantErr: `path "../../etc/passwd" leaves the volume`},
		{name: "absolute", data: data, items: []corev1.KeyToPath{{Key: "a", Path: "/etc/passwd"}}, wantErr: `path "/etc/passwd" leaves the volume`},
		{name: "bad key name", data: map[string]string{"..": "x"}, wantErr: `path ".." leaves the volume`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := volumeFiles(tc.data, tc.items, tc.mode, tc.optional)
			requireFiles(t, tc.want, tc.wantErr, got, err)
		})
	}
}

// The spec hash changes with the image, not with resources.
func TestSpecHash(t *testing.T) {
	c := testPod().Spec.Containers[0]
	h := specHash(&c)
	c.Resources.Limits = corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("1")}
	require.Equal(t, h, specHash(&c))
	c.Image = "img:2"
	require.NotEqual(t, h, specHash(&c))
}
