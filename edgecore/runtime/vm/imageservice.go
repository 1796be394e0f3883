package vm

import (
	"context"
	"errors"
	"strings"
	"syscall"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// The ImageService of the VM runtime answers from the edge image store.
// Nothing is pulled: images are imported ahead of time with
// `edgecore vm-image import`.

func criImage(img Image) *runtimeapi.Image {
	return &runtimeapi.Image{
		Id: img.Digest, RepoTags: []string{img.Name}, Size: uint64(img.FileSize),
		Spec: &runtimeapi.ImageSpec{Image: img.Name, RuntimeHandler: "tether-vm"},
	}
}

// imageByRef finds an image by name or digest; ok is false if none.
func (b *Backend) imageByRef(ref string) (Image, bool, error) {
	if strings.HasPrefix(ref, "sha256:") {
		list, err := b.cfg.Images.List()
		if err != nil {
			return Image{}, false, status.Errorf(codes.Internal, "list vm images: %v", err)
		}
		for _, img := range list {
			if img.Digest == ref {
				return img, true, nil
			}
		}
		return Image{}, false, nil
	}
	img, err := b.cfg.Images.Get(ref)
	switch {
	case errors.Is(err, ErrImageNotFound):
		return Image{}, false, nil
	case err != nil:
		return Image{}, false, status.Errorf(codes.Internal, "read vm image: %v", err)
	}
	return img, true, nil
}

// ListImages lists the store's images.
func (b *Backend) ListImages(_ context.Context, filter *runtimeapi.ImageFilter) ([]*runtimeapi.Image, error) {
	list, err := b.cfg.Images.List()
	if err != nil {
		return nil, status.Errorf(codes.Internal, "list vm images: %v", err)
	}
	out := make([]*runtimeapi.Image, 0, len(list))
	for _, img := range list {
		if want := filter.GetImage().GetImage(); want != "" && want != img.Name && want != img.Digest {
			continue
		}
		out = append(out, criImage(img))
	}
	return out, nil
}

// ImageStatus returns the image, or no image (not an error) when the store
// lacks it, as the CRI says.
func (b *Backend) ImageStatus(_ context.Context, spec *runtimeapi.ImageSpec, _ bool) (*runtimeapi.ImageStatusResponse, error) {
	img, ok, err := b.imageByRef(spec.GetImage())
	if err != nil || !ok {
		return &runtimeapi.ImageStatusResponse{}, err
	}
	return &runtimeapi.ImageStatusResponse{Image: criImage(img)}, nil
}

// PullImage succeeds for an imported image and is NotFound otherwise.
func (b *Backend) PullImage(_ context.Context, spec *runtimeapi.ImageSpec, _ *runtimeapi.AuthConfig, _ *runtimeapi.PodSandboxConfig) (string, error) {
	img, ok, err := b.imageByRef(spec.GetImage())
	if err != nil {
		return "", err
	}
	if !ok {
		return "", b.refuse("PullImage", "not_imported", status.Errorf(codes.NotFound,
			"vm image %q is not on this node: import it with edgecore vm-image import", spec.GetImage()))
	}
	return img.Digest, nil
}

// RemoveImage removes an image no VM sandbox uses (their overlays back
// onto it): FailedPrecondition otherwise. A missing image is not an error.
func (b *Backend) RemoveImage(_ context.Context, spec *runtimeapi.ImageSpec) error {
	img, ok, err := b.imageByRef(spec.GetImage())
	if err != nil || !ok {
		return err
	}
	err = b.cfg.Images.Remove(img.Name, func(img Image) error {
		for _, v := range b.snapshot() {
			v.mu.Lock()
			var user string
			if v.rec.Image == img.Name {
				user = v.rec.ID
			}
			v.mu.Unlock()
			if user != "" {
				return status.Errorf(codes.FailedPrecondition, "vm image %q is used by vm sandbox %s", img.Name, user)
			}
		}
		return nil
	})
	if errors.Is(err, ErrImageNotFound) {
		return nil
	}
	return err
}

// ImageFsInfo reports the image store's filesystem.
func (b *Backend) ImageFsInfo(context.Context) (*runtimeapi.ImageFsInfoResponse, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(b.cfg.Images.Dir(), &st); err != nil {
		return nil, status.Errorf(codes.Internal, "statfs vm images: %v", err)
	}
	var used uint64
	list, err := b.cfg.Images.List()
	if err != nil {
		return nil, status.Errorf(codes.Internal, "list vm images: %v", err)
	}
	for _, img := range list {
		used += uint64(img.FileSize)
	}
	return &runtimeapi.ImageFsInfoResponse{ImageFilesystems: []*runtimeapi.FilesystemUsage{{
		FsId:      &runtimeapi.FilesystemIdentifier{Mountpoint: b.cfg.Images.Dir()},
		UsedBytes: &runtimeapi.UInt64Value{Value: used},
	}}}, nil
}
