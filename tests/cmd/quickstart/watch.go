package main

import (
	"context"
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	watchtools "k8s.io/client-go/tools/watch"

	cloudvm "github.com/tetheredge/tether/cloudcore/vm"
	edgevm "github.com/tetheredge/tether/edgecore/runtime/vm"
)

// The milestones the quickstart prints once each, as they happen. The e2e
// test waits for these lines: keep them stable.
const (
	milestoneNodeReady  = "node %s Ready"
	milestonePodRunning = "pod %s/%s Running"
	milestoneVMBooted   = "vm %s/%s booted"
	milestoneAllUp      = "all up"
	// milestoneContainerd is followed by the private containerd's
	// directory.
	milestoneContainerd = "containerd in"
)

// watchNode returns once the node is Ready, printing its registration.
func (q *quickstart) watchNode(ctx context.Context, cs kubernetes.Interface) error {
	lw := cache.NewListWatchFromClient(cs.CoreV1().RESTClient(), "nodes", "", fields.OneTermEqualSelector("metadata.name", q.cfg.Node))
	registered := false
	_, err := watchtools.UntilWithSync(ctx, lw, &corev1.Node{}, nil, func(ev watch.Event) (bool, error) {
		n, ok := ev.Object.(*corev1.Node)
		if !ok {
			return false, nil
		}
		if !registered {
			registered = true
			q.say("node %s registered (labels %s)", n.Name, labelList(n.Labels))
		}
		for _, c := range n.Status.Conditions {
			if c.Type == corev1.NodeReady && c.Status == corev1.ConditionTrue {
				q.say(milestoneNodeReady+" (%s, %s cpu, %s memory)", n.Name, n.Status.NodeInfo.ContainerRuntimeVersion,
					n.Status.Capacity.Cpu(), n.Status.Capacity.Memory())
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		return fmt.Errorf("wait for node %s Ready: %w", q.cfg.Node, err)
	}
	return nil
}

// watchPod returns once the pod runs, printing each phase it passes.
func (q *quickstart) watchPod(ctx context.Context, cs kubernetes.Interface, ns, name string) error {
	lw := cache.NewListWatchFromClient(cs.CoreV1().RESTClient(), "pods", ns, fields.OneTermEqualSelector("metadata.name", name))
	last := corev1.PodPhase("")
	_, err := watchtools.UntilWithSync(ctx, lw, &corev1.Pod{}, nil, func(ev watch.Event) (bool, error) {
		p, ok := ev.Object.(*corev1.Pod)
		if !ok || p.Status.Phase == last {
			return false, nil
		}
		last = p.Status.Phase
		if p.Status.Phase != corev1.PodRunning {
			q.say("pod %s/%s %s", ns, name, phaseOr(string(p.Status.Phase)))
			if p.Status.Phase == corev1.PodFailed {
				return false, fmt.Errorf("pod %s/%s failed: %s %s", ns, name, p.Status.Reason, p.Status.Message)
			}
			return false, nil
		}
		q.say(milestonePodRunning+" on %s, ip %s", ns, name, p.Spec.NodeName, p.Status.PodIP)
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("wait for pod %s/%s Running: %w", ns, name, err)
	}
	return nil
}

// watchVM returns once the VM's console shows the guest's boot marker,
// printing each phase it passes.
func (q *quickstart) watchVM(ctx context.Context, dyn dynamic.Interface, ns, name string) error {
	res := dyn.Resource(cloudvm.GVR).Namespace(ns)
	sel := fields.OneTermEqualSelector("metadata.name", name).String()
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			o.FieldSelector = sel
			return res.List(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			o.FieldSelector = sel
			return res.Watch(ctx, o)
		},
	}
	last := cloudvm.Phase("-")
	_, err := watchtools.UntilWithSync(ctx, lw, &unstructured.Unstructured{}, nil, func(ev watch.Event) (bool, error) {
		u, ok := ev.Object.(*unstructured.Unstructured)
		if !ok {
			return false, nil
		}
		v, err := cloudvm.FromUnstructured(u)
		if err != nil {
			return false, fmt.Errorf("decode vm %s/%s: %w", ns, name, err)
		}
		st := v.Status
		booted := st.Phase == cloudvm.PhaseRunning && strings.Contains(st.Console, edgevm.BootMarker)
		if st.Phase != last && !booted {
			last = st.Phase
			q.say("vm %s/%s %s %s", ns, name, phaseOr(string(st.Phase)), st.Message)
		}
		if st.Phase == cloudvm.PhaseFailed {
			return false, fmt.Errorf("vm %s/%s failed: %s %s", ns, name, st.Reason, st.Message)
		}
		if !booted {
			return false, nil
		}
		q.say(milestoneVMBooted+" on %s (acceleration %s): its console shows %s", ns, name, st.NodeName, st.Acceleration, edgevm.BootMarker)
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("wait for vm %s/%s to boot: %w", ns, name, err)
	}
	return nil
}

func phaseOr(p string) string {
	if p == "" {
		return "(no phase yet)"
	}
	return p
}

func labelList(l map[string]string) string {
	if len(l) == 0 {
		return "none"
	}
	parts := make([]string, 0, len(l))
	for k, v := range l {
		parts = append(parts, k+"="+v)
	}
	return strings.Join(parts, ",")
}
