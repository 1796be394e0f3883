package cri

import (
	"context"
	"errors"
	"fmt"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	utilexec "k8s.io/utils/exec"
)

// The RuntimeService. Each method checks the fields it needs, picks the
// backend (by handler in RunPodSandbox, by id afterwards, all of them for
// lists) and passes the call through. Methods not written here are
// Unimplemented (UnimplementedRuntimeServiceServer).

// Version goes to the default backend.
func (s *Server) Version(ctx context.Context, req *runtimeapi.VersionRequest) (*runtimeapi.VersionResponse, error) {
	return s.route.backends.Default.Version(ctx, req.GetVersion())
}

// Status goes to the default backend.
func (s *Server) Status(ctx context.Context, req *runtimeapi.StatusRequest) (*runtimeapi.StatusResponse, error) {
	return s.route.backends.Default.Status(ctx, req.GetVerbose())
}

// RuntimeConfig goes to the default backend.
func (s *Server) RuntimeConfig(ctx context.Context, _ *runtimeapi.RuntimeConfigRequest) (*runtimeapi.RuntimeConfigResponse, error) {
	return s.route.backends.Default.RuntimeConfig(ctx)
}

// UpdateRuntimeConfig goes to every backend (it carries the pod CIDR).
func (s *Server) UpdateRuntimeConfig(ctx context.Context, req *runtimeapi.UpdateRuntimeConfigRequest) (*runtimeapi.UpdateRuntimeConfigResponse, error) {
	if req.GetRuntimeConfig() == nil {
		return nil, invalid("runtime_config is required")
	}
	if _, err := fanOut(ctx, s.route, func(ctx context.Context, b Backend) ([]struct{}, error) {
		return nil, b.UpdateRuntimeConfig(ctx, req.GetRuntimeConfig())
	}); err != nil {
		return nil, err
	}
	return &runtimeapi.UpdateRuntimeConfigResponse{}, nil
}

// RunPodSandbox runs the sandbox on the handler's backend and records the
// backend under the new id. If the record cannot be written the sandbox is
// removed again and the call fails, so no sandbox is ever unroutable.
func (s *Server) RunPodSandbox(ctx context.Context, req *runtimeapi.RunPodSandboxRequest) (*runtimeapi.RunPodSandboxResponse, error) {
	cfg := req.GetConfig()
	if cfg == nil || cfg.GetMetadata() == nil || cfg.GetMetadata().GetName() == "" {
		return nil, invalid("config with metadata.name is required")
	}
	nb, err := s.route.forHandler(req.GetRuntimeHandler())
	if err != nil {
		return nil, err
	}
	id, err := nb.b.RunPodSandbox(ctx, cfg, req.GetRuntimeHandler())
	if err != nil {
		return nil, err
	}
	if err := s.route.ids.PutSandbox(ctx, id, nb.name); err != nil {
		undo := errors.Join(nb.b.StopPodSandbox(context.WithoutCancel(ctx), id), nb.b.RemovePodSandbox(context.WithoutCancel(ctx), id))
		return nil, status.Errorf(codes.Unavailable, "record sandbox %s: %v (removed it again: %v)", id, err, undo)
	}
	return &runtimeapi.RunPodSandboxResponse{PodSandboxId: id}, nil
}

// StopPodSandbox routes by sandbox id.
func (s *Server) StopPodSandbox(ctx context.Context, req *runtimeapi.StopPodSandboxRequest) (*runtimeapi.StopPodSandboxResponse, error) {
	nb, err := s.sandbox(ctx, req.GetPodSandboxId())
	if err != nil {
		return nil, err
	}
	if err := nb.b.StopPodSandbox(ctx, req.GetPodSandboxId()); err != nil {
		return nil, err
	}
	return &runtimeapi.StopPodSandboxResponse{}, nil
}

// RemovePodSandbox removes the sandbox, then its record and its
// containers' records.
func (s *Server) RemovePodSandbox(ctx context.Context, req *runtimeapi.RemovePodSandboxRequest) (*runtimeapi.RemovePodSandboxResponse, error) {
	nb, err := s.sandbox(ctx, req.GetPodSandboxId())
	if err != nil {
		return nil, err
	}
	if err := nb.b.RemovePodSandbox(ctx, req.GetPodSandboxId()); err != nil && status.Code(err) != codes.NotFound {
		return nil, err
	}
	if err := s.route.ids.Delete(ctx, req.GetPodSandboxId()); err != nil {
		return nil, status.Errorf(codes.Unavailable, "forget sandbox %s: %v", req.GetPodSandboxId(), err)
	}
	return &runtimeapi.RemovePodSandboxResponse{}, nil
}

// PodSandboxStatus routes by sandbox id.
func (s *Server) PodSandboxStatus(ctx context.Context, req *runtimeapi.PodSandboxStatusRequest) (*runtimeapi.PodSandboxStatusResponse, error) {
	nb, err := s.sandbox(ctx, req.GetPodSandboxId())
	if err != nil {
		return nil, err
	}
	return nb.b.PodSandboxStatus(ctx, req.GetPodSandboxId(), req.GetVerbose())
}

// ListPodSandbox asks every backend and merges the answers.
func (s *Server) ListPodSandbox(ctx context.Context, req *runtimeapi.ListPodSandboxRequest) (*runtimeapi.ListPodSandboxResponse, error) {
	items, err := fanOut(ctx, s.route, func(ctx context.Context, b Backend) ([]*runtimeapi.PodSandbox, error) {
		return b.ListPodSandbox(ctx, req.GetFilter())
	})
	if err != nil {
		return nil, err
	}
	return &runtimeapi.ListPodSandboxResponse{Items: items}, nil
}

// PortForward routes by sandbox id.
func (s *Server) PortForward(ctx context.Context, req *runtimeapi.PortForwardRequest) (*runtimeapi.PortForwardResponse, error) {
	nb, err := s.sandbox(ctx, req.GetPodSandboxId())
	if err != nil {
		return nil, err
	}
	return nb.b.PortForward(ctx, req)
}

// PodSandboxStats routes by sandbox id.
func (s *Server) PodSandboxStats(ctx context.Context, req *runtimeapi.PodSandboxStatsRequest) (*runtimeapi.PodSandboxStatsResponse, error) {
	nb, err := s.sandbox(ctx, req.GetPodSandboxId())
	if err != nil {
		return nil, err
	}
	st, err := nb.b.PodSandboxStats(ctx, req.GetPodSandboxId())
	if err != nil {
		return nil, err
	}
	return &runtimeapi.PodSandboxStatsResponse{Stats: st}, nil
}

// ListPodSandboxStats asks every backend and merges the answers.
func (s *Server) ListPodSandboxStats(ctx context.Context, req *runtimeapi.ListPodSandboxStatsRequest) (*runtimeapi.ListPodSandboxStatsResponse, error) {
	items, err := fanOut(ctx, s.route, func(ctx context.Context, b Backend) ([]*runtimeapi.PodSandboxStats, error) {
		return b.ListPodSandboxStats(ctx, req.GetFilter())
	})
	if err != nil {
		return nil, err
	}
	return &runtimeapi.ListPodSandboxStatsResponse{Stats: items}, nil
}

// UpdatePodSandboxResources routes by sandbox id.
func (s *Server) UpdatePodSandboxResources(ctx context.Context, req *runtimeapi.UpdatePodSandboxResourcesRequest) (*runtimeapi.UpdatePodSandboxResourcesResponse, error) {
	nb, err := s.sandbox(ctx, req.GetPodSandboxId())
	if err != nil {
		return nil, err
	}
	return nb.b.UpdatePodSandboxResources(ctx, req)
}

// CreateContainer creates the container on its sandbox's backend and
// records it (a failed record removes it again).
func (s *Server) CreateContainer(ctx context.Context, req *runtimeapi.CreateContainerRequest) (*runtimeapi.CreateContainerResponse, error) {
	cfg := req.GetConfig()
	switch {
	case cfg == nil || cfg.GetMetadata() == nil || cfg.GetMetadata().GetName() == "":
		return nil, invalid("config with metadata.name is required")
	case cfg.GetImage() == nil || cfg.GetImage().GetImage() == "":
		return nil, invalid("config.image is required")
	case req.GetSandboxConfig() == nil:
		return nil, invalid("sandbox_config is required")
	}
	nb, err := s.sandbox(ctx, req.GetPodSandboxId())
	if err != nil {
		return nil, err
	}
	id, err := nb.b.CreateContainer(ctx, req.GetPodSandboxId(), cfg, req.GetSandboxConfig())
	if err != nil {
		return nil, err
	}
	if err := s.route.ids.PutContainer(ctx, id, req.GetPodSandboxId(), nb.name); err != nil {
		undo := nb.b.RemoveContainer(context.WithoutCancel(ctx), id)
		return nil, status.Errorf(codes.Unavailable, "record container %s: %v (removed it again: %v)", id, err, undo)
	}
	return &runtimeapi.CreateContainerResponse{ContainerId: id}, nil
}

// StartContainer routes by container id.
func (s *Server) StartContainer(ctx context.Context, req *runtimeapi.StartContainerRequest) (*runtimeapi.StartContainerResponse, error) {
	nb, err := s.container(ctx, req.GetContainerId())
	if err != nil {
		return nil, err
	}
	if err := nb.b.StartContainer(ctx, req.GetContainerId()); err != nil {
		return nil, err
	}
	return &runtimeapi.StartContainerResponse{}, nil
}

// StopContainer routes by container id.
func (s *Server) StopContainer(ctx context.Context, req *runtimeapi.StopContainerRequest) (*runtimeapi.StopContainerResponse, error) {
	nb, err := s.container(ctx, req.GetContainerId())
	if err != nil {
		return nil, err
	}
	if err := nb.b.StopContainer(ctx, req.GetContainerId(), req.GetTimeout()); err != nil {
		return nil, err
	}
	return &runtimeapi.StopContainerResponse{}, nil
}

// RemoveContainer routes by container id.
func (s *Server) RemoveContainer(ctx context.Context, req *runtimeapi.RemoveContainerRequest) (*runtimeapi.RemoveContainerResponse, error) {
	nb, err := s.container(ctx, req.GetContainerId())
	if err != nil {
		return nil, err
	}
	if err := nb.b.RemoveContainer(ctx, req.GetContainerId()); err != nil && status.Code(err) != codes.NotFound {
		return nil, err
	}
	if err := s.route.ids.Delete(ctx, req.GetContainerId()); err != nil {
		return nil, status.Errorf(codes.Unavailable, "forget container %s: %v", req.GetContainerId(), err)
	}
	return &runtimeapi.RemoveContainerResponse{}, nil
}

// ListContainers asks every backend and merges the answers.
func (s *Server) ListContainers(ctx context.Context, req *runtimeapi.ListContainersRequest) (*runtimeapi.ListContainersResponse, error) {
	items, err := fanOut(ctx, s.route, func(ctx context.Context, b Backend) ([]*runtimeapi.Container, error) {
		return b.ListContainers(ctx, req.GetFilter())
	})
	if err != nil {
		return nil, err
	}
	return &runtimeapi.ListContainersResponse{Containers: items}, nil
}

// ContainerStatus routes by container id.
func (s *Server) ContainerStatus(ctx context.Context, req *runtimeapi.ContainerStatusRequest) (*runtimeapi.ContainerStatusResponse, error) {
	nb, err := s.container(ctx, req.GetContainerId())
	if err != nil {
		return nil, err
	}
	return nb.b.ContainerStatus(ctx, req.GetContainerId(), req.GetVerbose())
}

// UpdateContainerResources routes by container id.
func (s *Server) UpdateContainerResources(ctx context.Context, req *runtimeapi.UpdateContainerResourcesRequest) (*runtimeapi.UpdateContainerResourcesResponse, error) {
	nb, err := s.container(ctx, req.GetContainerId())
	if err != nil {
		return nil, err
	}
	if err := nb.b.UpdateContainerResources(ctx, req.GetContainerId(), &runtimeapi.ContainerResources{
		Linux: req.GetLinux(), Windows: req.GetWindows(),
	}); err != nil {
		return nil, err
	}
	return &runtimeapi.UpdateContainerResourcesResponse{}, nil
}

// ReopenContainerLog routes by container id.
func (s *Server) ReopenContainerLog(ctx context.Context, req *runtimeapi.ReopenContainerLogRequest) (*runtimeapi.ReopenContainerLogResponse, error) {
	nb, err := s.container(ctx, req.GetContainerId())
	if err != nil {
		return nil, err
	}
	if err := nb.b.ReopenContainerLog(ctx, req.GetContainerId()); err != nil {
		return nil, err
	}
	return &runtimeapi.ReopenContainerLogResponse{}, nil
}

// ExecSync returns a non-zero exit code in the response, as the CRI does
// (cri-client turns it into an error, which is undone here).
func (s *Server) ExecSync(ctx context.Context, req *runtimeapi.ExecSyncRequest) (*runtimeapi.ExecSyncResponse, error) {
	if len(req.GetCmd()) == 0 {
		return nil, invalid("cmd is required")
	}
	nb, err := s.container(ctx, req.GetContainerId())
	if err != nil {
		return nil, err
	}
	stdout, stderr, err := nb.b.ExecSync(ctx, req.GetContainerId(), req.GetCmd(), time.Duration(req.GetTimeout())*time.Second)
	var exit utilexec.ExitError
	switch {
	case errors.As(err, &exit):
		return &runtimeapi.ExecSyncResponse{Stdout: stdout, Stderr: stderr, ExitCode: int32(exit.ExitStatus())}, nil
	case err != nil:
		return nil, err
	}
	return &runtimeapi.ExecSyncResponse{Stdout: stdout, Stderr: stderr}, nil
}

// Exec returns the backend's streaming URL, as Attach and PortForward do:
// the stream itself goes from the caller to the backend's streaming server.
func (s *Server) Exec(ctx context.Context, req *runtimeapi.ExecRequest) (*runtimeapi.ExecResponse, error) {
	if len(req.GetCmd()) == 0 {
		return nil, invalid("cmd is required")
	}
	nb, err := s.container(ctx, req.GetContainerId())
	if err != nil {
		return nil, err
	}
	return nb.b.Exec(ctx, req)
}

// Attach routes by container id.
func (s *Server) Attach(ctx context.Context, req *runtimeapi.AttachRequest) (*runtimeapi.AttachResponse, error) {
	nb, err := s.container(ctx, req.GetContainerId())
	if err != nil {
		return nil, err
	}
	return nb.b.Attach(ctx, req)
}

// ContainerStats routes by container id.
func (s *Server) ContainerStats(ctx context.Context, req *runtimeapi.ContainerStatsRequest) (*runtimeapi.ContainerStatsResponse, error) {
	nb, err := s.container(ctx, req.GetContainerId())
	if err != nil {
		return nil, err
	}
	st, err := nb.b.ContainerStats(ctx, req.GetContainerId())
	if err != nil {
		return nil, err
	}
	return &runtimeapi.ContainerStatsResponse{Stats: st}, nil
}

// ListContainerStats asks every backend and merges the answers.
func (s *Server) ListContainerStats(ctx context.Context, req *runtimeapi.ListContainerStatsRequest) (*runtimeapi.ListContainerStatsResponse, error) {
	items, err := fanOut(ctx, s.route, func(ctx context.Context, b Backend) ([]*runtimeapi.ContainerStats, error) {
		return b.ListContainerStats(ctx, req.GetFilter())
	})
	if err != nil {
		return nil, err
	}
	return &runtimeapi.ListContainerStatsResponse{Stats: items}, nil
}

// CheckpointContainer routes by container id.
func (s *Server) CheckpointContainer(ctx context.Context, req *runtimeapi.CheckpointContainerRequest) (*runtimeapi.CheckpointContainerResponse, error) {
	nb, err := s.container(ctx, req.GetContainerId())
	if err != nil {
		return nil, err
	}
	if err := nb.b.CheckpointContainer(ctx, req); err != nil {
		return nil, err
	}
	return &runtimeapi.CheckpointContainerResponse{}, nil
}

// ListMetricDescriptors asks every backend and merges the answers.
func (s *Server) ListMetricDescriptors(ctx context.Context, _ *runtimeapi.ListMetricDescriptorsRequest) (*runtimeapi.ListMetricDescriptorsResponse, error) {
	items, err := fanOut(ctx, s.route, func(ctx context.Context, b Backend) ([]*runtimeapi.MetricDescriptor, error) {
		return b.ListMetricDescriptors(ctx)
	})
	if err != nil {
		return nil, err
	}
	return &runtimeapi.ListMetricDescriptorsResponse{Descriptors: items}, nil
}

// ListPodSandboxMetrics asks every backend and merges the answers.
func (s *Server) ListPodSandboxMetrics(ctx context.Context, _ *runtimeapi.ListPodSandboxMetricsRequest) (*runtimeapi.ListPodSandboxMetricsResponse, error) {
	items, err := fanOut(ctx, s.route, func(ctx context.Context, b Backend) ([]*runtimeapi.PodSandboxMetrics, error) {
		return b.ListPodSandboxMetrics(ctx)
	})
	if err != nil {
		return nil, err
	}
	return &runtimeapi.ListPodSandboxMetricsResponse{PodMetrics: items}, nil
}

// sandbox checks a sandbox id and returns its backend.
func (s *Server) sandbox(ctx context.Context, id string) (named, error) {
	if id == "" {
		return named{}, invalid("pod_sandbox_id is required")
	}
	return s.route.forID(ctx, id)
}

// container checks a container id and returns its backend.
func (s *Server) container(ctx context.Context, id string) (named, error) {
	if id == "" {
		return named{}, invalid("container_id is required")
	}
	nb, err := s.route.forID(ctx, id)
	if err != nil {
		return named{}, fmt.Errorf("route container: %w", err)
	}
	return nb, nil
}
