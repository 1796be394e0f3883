package cri

import (
	"context"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// The ImageService. An image names its runtime handler in
// ImageSpec.runtime_handler ("" for the default); the shim routes by it as
// RunPodSandbox does. ListImages and ImageFsInfo cover every backend.

// ListImages asks every backend and merges the answers.
func (s *Server) ListImages(ctx context.Context, req *runtimeapi.ListImagesRequest) (*runtimeapi.ListImagesResponse, error) {
	items, err := fanOut(ctx, s.route, func(ctx context.Context, b Backend) ([]*runtimeapi.Image, error) {
		return b.ListImages(ctx, req.GetFilter())
	})
	if err != nil {
		return nil, err
	}
	return &runtimeapi.ListImagesResponse{Images: items}, nil
}

// ImageStatus routes by the image's runtime handler.
func (s *Server) ImageStatus(ctx context.Context, req *runtimeapi.ImageStatusRequest) (*runtimeapi.ImageStatusResponse, error) {
	nb, err := s.image(req.GetImage())
	if err != nil {
		return nil, err
	}
	return nb.b.ImageStatus(ctx, req.GetImage(), req.GetVerbose())
}

// PullImage routes by the image's runtime handler.
func (s *Server) PullImage(ctx context.Context, req *runtimeapi.PullImageRequest) (*runtimeapi.PullImageResponse, error) {
	nb, err := s.image(req.GetImage())
	if err != nil {
		return nil, err
	}
	ref, err := nb.b.PullImage(ctx, req.GetImage(), req.GetAuth(), req.GetSandboxConfig())
	if err != nil {
		return nil, err
	}
	return &runtimeapi.PullImageResponse{ImageRef: ref}, nil
}

// RemoveImage routes by the image's runtime handler.
func (s *Server) RemoveImage(ctx context.Context, req *runtimeapi.RemoveImageRequest) (*runtimeapi.RemoveImageResponse, error) {
	nb, err := s.image(req.GetImage())
	if err != nil {
		return nil, err
	}
	if err := nb.b.RemoveImage(ctx, req.GetImage()); err != nil {
		return nil, err
	}
	return &runtimeapi.RemoveImageResponse{}, nil
}

// ImageFsInfo asks every backend and merges the answers.
func (s *Server) ImageFsInfo(ctx context.Context, _ *runtimeapi.ImageFsInfoRequest) (*runtimeapi.ImageFsInfoResponse, error) {
	out := &runtimeapi.ImageFsInfoResponse{}
	if _, err := fanOut(ctx, s.route, func(ctx context.Context, b Backend) ([]struct{}, error) {
		r, err := b.ImageFsInfo(ctx)
		if err != nil {
			return nil, err
		}
		out.ImageFilesystems = append(out.ImageFilesystems, r.GetImageFilesystems()...)
		out.ContainerFilesystems = append(out.ContainerFilesystems, r.GetContainerFilesystems()...)
		return nil, nil
	}); err != nil {
		return nil, err
	}
	return out, nil
}

// image checks an image spec and returns the backend of its handler.
func (s *Server) image(spec *runtimeapi.ImageSpec) (named, error) {
	if spec.GetImage() == "" {
		return named{}, invalid("image.image is required")
	}
	return s.route.forHandler(spec.GetRuntimeHandler())
}
