package containerd

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	internalapi "k8s.io/cri-api/pkg/apis"
)

// RunAlone is the runtime baseline of the pod benchmarks (issue 8, section
// 6): n host-network pods of PodSandboxConfig and BusyboxContainer
// `sleep 3600`, run straight to containerd through the CRI
// (RunPodSandbox, CreateContainer, StartContainer), one after another or
// from n goroutines at once. It returns each pod's time from the start of
// RunPodSandbox to StartContainer's return, then removes the pods
// (untimed). rt is the CRI client to use: h.Runtime for containerd
// alone, or one connected to a CRI shim in front of h.
func (h *Host) RunAlone(ctx context.Context, rt internalapi.RuntimeService, prefix string, n int, together bool) ([]time.Duration, error) {
	out := make([]time.Duration, n)
	ids := make([]string, n)
	one := func(i int) error {
		name := fmt.Sprintf("%s-%d", prefix, i)
		sb := h.PodSandboxConfig(name, true)
		c := h.BusyboxContainer(name, "sleep", "3600")
		t0 := time.Now()
		id, err := rt.RunPodSandbox(ctx, sb, "")
		if err != nil {
			return fmt.Errorf("run sandbox %s: %w", name, err)
		}
		ids[i] = id
		ctr, err := rt.CreateContainer(ctx, id, c, sb)
		if err != nil {
			return fmt.Errorf("create container %s: %w", name, err)
		}
		if err := rt.StartContainer(ctx, ctr); err != nil {
			return fmt.Errorf("start container %s: %w", name, err)
		}
		out[i] = time.Since(t0)
		return nil
	}
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		if !together {
			errs[i] = one(i)
			continue
		}
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = one(i) }()
	}
	wg.Wait()
	for _, id := range ids {
		if id == "" {
			continue
		}
		if err := rt.StopPodSandbox(ctx, id); err != nil {
			errs = append(errs, fmt.Errorf("stop sandbox %s: %w", id, err))
		} else if err := rt.RemovePodSandbox(ctx, id); err != nil {
			errs = append(errs, fmt.Errorf("remove sandbox %s: %w", id, err))
		}
	}
	return out, errors.Join(errs...)
}
