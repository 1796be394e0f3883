package pods

import (
	"cmp"
	"encoding/json"
	"fmt"
	"hash/fnv"
	"path/filepath"
	"slices"
	"strconv"

	corev1 "k8s.io/api/core/v1"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// The labels and annotations kubelet puts on sandboxes and containers. The
// labels find a pod's sandboxes and containers again, also after a restart
// of EdgeCore, and tools such as crictl show them.
const (
	labelPodName       = "io.kubernetes.pod.name"
	labelPodNamespace  = "io.kubernetes.pod.namespace"
	labelPodUID        = "io.kubernetes.pod.uid"
	labelContainerName = "io.kubernetes.container.name"

	annotationRestartCount = "io.kubernetes.container.restartCount"
	annotationGracePeriod  = "io.kubernetes.pod.terminationGracePeriod"
	// annotationBackoffStep is Tether's: the crash-loop back-off step of the
	// container instance (see backoff).
	annotationBackoffStep = "tether.io/backoff-step"
	// annotationSpecHash is the hash of the container's spec (specHash),
	// as kubelet's io.kubernetes.container.hash: a running container whose
	// spec changed is replaced.
	annotationSpecHash = "io.kubernetes.container.hash"
)

// specHash is the FNV-1a hash of the container's spec JSON, resources
// left out (kubelet resizes those in place; this manager does not yet).
func specHash(c *corev1.Container) string {
	cc := c.DeepCopy()
	cc.Resources = corev1.ResourceRequirements{}
	data, _ := json.Marshal(cc) // a Container always marshals
	h := fnv.New32a()
	_, _ = h.Write(data)
	return strconv.FormatUint(uint64(h.Sum32()), 16)
}

// Kubelet's CPU conversion constants (pkg/kubelet/cm/helpers_linux.go).
const (
	minShares     = 2
	maxShares     = 262144
	sharesPerCPU  = 1024
	milliCPUToCPU = 1000
	quotaPeriod   = 100000 // 100 ms, in µs
	minQuotaUs    = 1000
)

// defaultGracePeriod is the API server's default terminationGracePeriodSeconds.
const defaultGracePeriod = 30

func podLabels(pod *corev1.Pod) map[string]string {
	return map[string]string{
		labelPodName:      pod.Name,
		labelPodNamespace: pod.Namespace,
		labelPodUID:       string(pod.UID),
	}
}

func hostNetwork(pod *corev1.Pod) bool { return pod.Spec.HostNetwork }

func networkMode(pod *corev1.Pod) runtimeapi.NamespaceMode {
	if hostNetwork(pod) {
		return runtimeapi.NamespaceMode_NODE
	}
	return runtimeapi.NamespaceMode_POD
}

// podLogDir is the pod's log directory under logDir, named as kubelet
// names it.
func podLogDir(logDir string, pod *corev1.Pod) string {
	return filepath.Join(logDir, pod.Namespace+"_"+pod.Name+"_"+string(pod.UID))
}

// gracePeriod is how long a pod's containers get between SIGTERM and
// SIGKILL: the deletion's grace period, else the spec's, else 30 s.
func gracePeriod(pod *corev1.Pod) int64 {
	switch {
	case pod.DeletionGracePeriodSeconds != nil:
		return *pod.DeletionGracePeriodSeconds
	case pod.Spec.TerminationGracePeriodSeconds != nil:
		return *pod.Spec.TerminationGracePeriodSeconds
	}
	return defaultGracePeriod
}

// sandboxConfig is the CRI sandbox of pod. It must come out the same for
// RunPodSandbox and every later CreateContainer in that sandbox.
func sandboxConfig(pod *corev1.Pod, attempt uint32, logDir string) *runtimeapi.PodSandboxConfig {
	hostname := cmp.Or(pod.Spec.Hostname, pod.Name)
	if hostNetwork(pod) {
		// The node's UTS namespace: runc refuses to set a hostname there.
		hostname = ""
	}
	labels := podLabels(pod)
	for k, v := range pod.Labels {
		if _, ours := labels[k]; !ours {
			labels[k] = v
		}
	}
	privileged := false
	var ports []*runtimeapi.PortMapping
	for _, c := range slices.Concat(pod.Spec.InitContainers, pod.Spec.Containers) {
		if sc := c.SecurityContext; sc != nil && sc.Privileged != nil && *sc.Privileged {
			privileged = true
		}
		for _, p := range c.Ports {
			if p.HostPort == 0 {
				continue
			}
			ports = append(ports, &runtimeapi.PortMapping{
				Protocol:      protocol(p.Protocol),
				ContainerPort: p.ContainerPort,
				HostPort:      p.HostPort,
				HostIp:        p.HostIP,
			})
		}
	}
	return &runtimeapi.PodSandboxConfig{
		Metadata: &runtimeapi.PodSandboxMetadata{
			Name: pod.Name, Namespace: pod.Namespace, Uid: string(pod.UID), Attempt: attempt,
		},
		Hostname:     hostname,
		LogDirectory: podLogDir(logDir, pod),
		PortMappings: ports,
		Labels:       labels,
		Annotations:  maps(pod.Annotations),
		Linux: &runtimeapi.LinuxPodSandboxConfig{
			SecurityContext: &runtimeapi.LinuxSandboxSecurityContext{
				NamespaceOptions: &runtimeapi.NamespaceOption{Network: networkMode(pod)},
				Privileged:       privileged,
			},
		},
	}
}

func protocol(p corev1.Protocol) runtimeapi.Protocol {
	switch p {
	case corev1.ProtocolUDP:
		return runtimeapi.Protocol_UDP
	case corev1.ProtocolSCTP:
		return runtimeapi.Protocol_SCTP
	}
	return runtimeapi.Protocol_TCP
}

func maps(m map[string]string) map[string]string {
	if len(m) == 0 {
		return nil
	}
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// containerConfig is the CRI config of instance attempt of container c of
// pod, with its resolved env, carrying back-off step step.
func containerConfig(pod *corev1.Pod, c *corev1.Container, attempt uint32, step int, env []*runtimeapi.KeyValue) *runtimeapi.ContainerConfig {
	labels := podLabels(pod)
	labels[labelContainerName] = c.Name
	return &runtimeapi.ContainerConfig{
		Metadata:   &runtimeapi.ContainerMetadata{Name: c.Name, Attempt: attempt},
		Image:      &runtimeapi.ImageSpec{Image: c.Image, UserSpecifiedImage: c.Image},
		Command:    c.Command,
		Args:       c.Args,
		WorkingDir: c.WorkingDir,
		Envs:       env,
		Labels:     labels,
		Annotations: map[string]string{
			annotationRestartCount: strconv.FormatUint(uint64(attempt), 10),
			annotationGracePeriod:  strconv.FormatInt(gracePeriod(pod), 10),
			annotationBackoffStep:  strconv.Itoa(step),
			annotationSpecHash:     specHash(c),
		},
		LogPath: fmt.Sprintf("%s_%d.log", c.Name, attempt),
		Stdin:   c.Stdin, StdinOnce: c.StdinOnce, Tty: c.TTY,
		Linux: &runtimeapi.LinuxContainerConfig{
			Resources:       linuxResources(c),
			SecurityContext: securityContext(pod, c),
		},
	}
}

// linuxResources applies kubelet's formulas: CPU shares from the request
// (1024 per CPU, at least 2), a CFS quota from the limit over a 100 ms
// period (at least 1 ms), and the memory limit in bytes. A limit without a
// request counts as the request, as the API server's defaulting does.
func linuxResources(c *corev1.Container) *runtimeapi.LinuxContainerResources {
	req := c.Resources.Requests.Cpu().MilliValue()
	limit := c.Resources.Limits.Cpu().MilliValue()
	if req == 0 && limit > 0 {
		req = limit
	}
	r := &runtimeapi.LinuxContainerResources{CpuShares: milliCPUToShares(req)}
	if limit > 0 {
		r.CpuPeriod = quotaPeriod
		r.CpuQuota = milliCPUToQuota(limit)
	}
	if mem := c.Resources.Limits.Memory().Value(); mem > 0 {
		r.MemoryLimitInBytes = mem
	}
	return r
}

func milliCPUToShares(milli int64) int64 {
	if milli == 0 {
		return minShares
	}
	return min(max(milli*sharesPerCPU/milliCPUToCPU, minShares), maxShares)
}

func milliCPUToQuota(milli int64) int64 {
	if milli == 0 {
		return 0
	}
	return max(milli*quotaPeriod/milliCPUToCPU, minQuotaUs)
}

// securityContext maps the container's securityContext (runAsUser falling
// back to the pod's) and joins the pod's network namespace.
func securityContext(pod *corev1.Pod, c *corev1.Container) *runtimeapi.LinuxContainerSecurityContext {
	out := &runtimeapi.LinuxContainerSecurityContext{
		NamespaceOptions: &runtimeapi.NamespaceOption{
			Network: networkMode(pod),
			Pid:     runtimeapi.NamespaceMode_CONTAINER,
			Ipc:     runtimeapi.NamespaceMode_POD,
		},
	}
	if psc := pod.Spec.SecurityContext; psc != nil && psc.RunAsUser != nil {
		out.RunAsUser = &runtimeapi.Int64Value{Value: *psc.RunAsUser}
	}
	sc := c.SecurityContext
	if sc == nil {
		return out
	}
	if sc.RunAsUser != nil {
		out.RunAsUser = &runtimeapi.Int64Value{Value: *sc.RunAsUser}
	}
	if sc.Privileged != nil {
		out.Privileged = *sc.Privileged
	}
	if sc.ReadOnlyRootFilesystem != nil {
		out.ReadonlyRootfs = *sc.ReadOnlyRootFilesystem
	}
	if caps := sc.Capabilities; caps != nil {
		out.Capabilities = &runtimeapi.Capability{}
		for _, c := range caps.Add {
			out.Capabilities.AddCapabilities = append(out.Capabilities.AddCapabilities, string(c))
		}
		for _, c := range caps.Drop {
			out.Capabilities.DropCapabilities = append(out.Capabilities.DropCapabilities, string(c))
		}
	}
	return out
}
