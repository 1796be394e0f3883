package containerd

import (
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// PodSandboxConfig returns a minimal sandbox config: a pod named name in
// namespace default with UID "uid-"+name, its container logs in a fresh
// PodLogDir. hostNetwork puts it in the node's network namespace (and, as
// kubelet does, gives it no hostname: it shares the node's UTS namespace,
// and runc refuses a hostname there); otherwise it gets its own network
// namespace, which needs a host started WithCNI.
func (h *Host) PodSandboxConfig(name string, hostNetwork bool) *runtimeapi.PodSandboxConfig {
	h.tb.Helper()
	mode, hostname := runtimeapi.NamespaceMode_POD, name
	if hostNetwork {
		mode, hostname = runtimeapi.NamespaceMode_NODE, ""
	}
	return &runtimeapi.PodSandboxConfig{
		Metadata:     &runtimeapi.PodSandboxMetadata{Name: name, Namespace: "default", Uid: "uid-" + name},
		Hostname:     hostname,
		LogDirectory: h.PodLogDir(name),
		Linux: &runtimeapi.LinuxPodSandboxConfig{
			SecurityContext: &runtimeapi.LinuxSandboxSecurityContext{
				NamespaceOptions: &runtimeapi.NamespaceOption{Network: mode},
			},
		},
	}
}

// BusyboxContainer returns a config for a container of BusyboxImage named
// name that runs cmd and logs to <name>.log in the sandbox's log directory.
func (h *Host) BusyboxContainer(name string, cmd ...string) *runtimeapi.ContainerConfig {
	return &runtimeapi.ContainerConfig{
		Metadata: &runtimeapi.ContainerMetadata{Name: name},
		Image:    &runtimeapi.ImageSpec{Image: h.BusyboxImage},
		Command:  cmd,
		LogPath:  name + ".log",
	}
}
