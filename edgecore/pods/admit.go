package pods

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/tetheredge/tether/common/objsync"
)

// Admission, as kubelet's resource fit check does it: a pod is admitted
// when its effective requests fit in the node's allocatable minus the sum
// of the effective requests of the admitted pods that have not finished.
// A pod that does not fit is never started: its status is Failed with
// reason "OutOf<resource>" and kubelet's message.
//
// The decision is taken once per pod UID and kept. A pod whose sandbox
// exists is admitted without a check: it was admitted before (also by an
// earlier run of EdgeCore, whose admissions Run rebuilds from the
// sandboxes before the first sync), and taking a running pod down because
// allocatable shrank is eviction, not admission. A pod whose stored status
// is already Failed or Succeeded and has no sandbox is not started again
// either (kubelet never restarts a terminal pod); this keeps a rejection
// across an EdgeCore restart once the cloud holds the Failed status.
//
// Cost: one decision sums the requests of the admitted pods, O(pods ×
// resources) under the admission lock; with the 110 pods of a kubelet
// that is microseconds, taken once per pod.

// rejection is why a pod was not admitted: kubelet's reason and message.
type rejection struct {
	Reason, Message string
	// stored: the pod's stored status (Failed or Succeeded) stands, and
	// nothing is published.
	stored bool
}

// effectiveRequests is what a pod reserves on the node, as kubelet
// computes it: per resource, the larger of the sum over the app containers
// and the largest init container, plus the pod's overhead. A limit without
// a request counts as the request, as the API server's defaulting does.
func effectiveRequests(pod *corev1.Pod) corev1.ResourceList {
	out := corev1.ResourceList{}
	for i := range pod.Spec.Containers {
		for name, q := range containerRequests(&pod.Spec.Containers[i]) {
			add(out, name, q)
		}
	}
	for i := range pod.Spec.InitContainers {
		for name, q := range containerRequests(&pod.Spec.InitContainers[i]) {
			if cur, ok := out[name]; !ok || q.Cmp(cur) > 0 {
				out[name] = q.DeepCopy()
			}
		}
	}
	for name, q := range pod.Spec.Overhead {
		add(out, name, q)
	}
	return out
}

func containerRequests(c *corev1.Container) corev1.ResourceList {
	out := corev1.ResourceList{}
	for name, q := range c.Resources.Limits {
		out[name] = q.DeepCopy()
	}
	for name, q := range c.Resources.Requests {
		out[name] = q.DeepCopy()
	}
	return out
}

func add(list corev1.ResourceList, name corev1.ResourceName, q resource.Quantity) {
	cur := list[name]
	cur.Add(q)
	list[name] = cur
}

// fits decides whether a pod requesting req fits on a node with
// allocatable, where the admitted pods already use used (the sum of
// their effective requests) and count of them run. A nil allocatable
// admits everything. Resources are checked in a fixed order (pods, cpu,
// memory, then by name) and the first that does not fit is the reason,
// as kubelet reports one.
//
// A resource allocatable does not name is not checked, except
// hugepages-*: a node that names none has none, as kubelet's check says.
// Extended resources (example.com/gpu) the node does not name are
// ignored, as kubelet drops them before its check.
func fits(req, used corev1.ResourceList, count int, allocatable corev1.ResourceList) (rejection, bool) {
	if allocatable == nil {
		return rejection{}, true
	}
	if capacity, ok := allocatable[corev1.ResourcePods]; ok && int64(count)+1 > capacity.Value() {
		return reject(corev1.ResourcePods, 1, int64(count), capacity.Value()), false
	}
	names := make([]corev1.ResourceName, 0, len(req))
	for name := range req {
		if name != corev1.ResourcePods {
			names = append(names, name)
		}
	}
	slices.SortFunc(names, func(a, b corev1.ResourceName) int {
		return rank(a) - rank(b)
	})
	for _, name := range names {
		q := req[name]
		if q.Sign() <= 0 {
			continue
		}
		capacity, ok := allocatable[name]
		if !ok && !strings.HasPrefix(string(name), corev1.ResourceHugePagesPrefix) {
			continue
		}
		u := used[name]
		free := capacity.DeepCopy()
		free.Sub(u)
		if q.Cmp(free) > 0 {
			return reject(name, value(name, q), value(name, u), value(name, capacity)), false
		}
	}
	return rejection{}, true
}

// rank orders cpu and memory first, then every other resource by name.
func rank(name corev1.ResourceName) int {
	switch name {
	case corev1.ResourceCPU:
		return -2
	case corev1.ResourceMemory:
		return -1
	}
	return 0
}

// value is how kubelet prints a quantity in its message: millicores for
// cpu, whole units (bytes) for the rest.
func value(name corev1.ResourceName, q resource.Quantity) int64 {
	if name == corev1.ResourceCPU {
		return q.MilliValue()
	}
	return q.Value()
}

func reject(name corev1.ResourceName, requested, used, capacity int64) rejection {
	return rejection{
		Reason: "OutOf" + string(name),
		Message: fmt.Sprintf("Pod was rejected: Node didn't have enough resource: %s, requested: %d, used: %d, capacity: %d",
			name, requested, used, capacity),
	}
}

// admission holds the decisions, per pod UID. Guarded by Manager.mu.
type admission struct {
	// admitted are the effective requests of the admitted pods that have
	// not finished.
	admitted map[string]corev1.ResourceList
	// rejected are the pods refused, with why.
	rejected map[string]rejection
	// finished are admitted pods that finished for good: they no longer
	// reserve anything, and they stay admitted.
	finished map[string]bool
}

func newAdmission() admission {
	return admission{
		admitted: make(map[string]corev1.ResourceList),
		rejected: make(map[string]rejection),
		finished: make(map[string]bool),
	}
}

// admit decides, once, whether pod may run; hasSandbox says whether one of
// its sandboxes exists. It returns the rejection of a pod that may not.
func (m *Manager) admit(pod *corev1.Pod, hasSandbox bool) (rejection, bool) {
	uid := string(pod.UID)
	m.mu.Lock()
	defer m.mu.Unlock()
	a := &m.admission
	if _, ok := a.admitted[uid]; ok || a.finished[uid] {
		return rejection{}, true
	}
	if r, ok := a.rejected[uid]; ok {
		return r, false
	}
	if hasSandbox {
		a.admitted[uid] = effectiveRequests(pod)
		return rejection{}, true
	}
	if p := pod.Status.Phase; p == corev1.PodFailed || p == corev1.PodSucceeded {
		// Finished before (rejected, or by an earlier run): never again.
		r := rejection{stored: true}
		a.rejected[uid] = r
		return r, false
	}
	used := corev1.ResourceList{}
	for _, req := range a.admitted {
		for name, q := range req {
			add(used, name, q)
		}
	}
	req := effectiveRequests(pod)
	r, ok := fits(req, used, len(a.admitted), m.cfg.Allocatable)
	if !ok {
		a.rejected[uid] = r
		return r, false
	}
	a.admitted[uid] = req
	return rejection{}, true
}

// finish records that an admitted pod finished for good (its phase is
// Succeeded or Failed) or is gone: it reserves nothing any more. gone
// forgets it altogether.
func (m *Manager) finish(uid string, gone bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	a := &m.admission
	if _, ok := a.admitted[uid]; ok && !gone {
		a.finished[uid] = true
	}
	delete(a.admitted, uid)
	if gone {
		delete(a.rejected, uid)
		delete(a.finished, uid)
	}
}

// adoptAdmitted admits, before the first sync, the stored pods whose
// sandboxes exist, so that what an earlier run admitted counts against a
// pod the new run has not seen yet.
func (m *Manager) adoptAdmitted(ctx context.Context) error {
	sbs, err := m.rt.ListPodSandbox(ctx, nil)
	if err != nil {
		return fmt.Errorf("list sandboxes: %w", err)
	}
	for _, sb := range sbs {
		key, ok := podKeyOf(sb.GetLabels())
		if !ok {
			continue
		}
		ns, name := splitKey(key)
		obj, ok, err := m.st.Get(ctx, objsync.Key{Kind: "Pod", Namespace: ns, Name: name})
		if err != nil {
			return fmt.Errorf("read pod %s: %w", key, err)
		}
		var pod corev1.Pod
		if !ok || json.Unmarshal(obj.Data, &pod) != nil || string(pod.UID) != sb.GetLabels()[labelPodUID] {
			continue // the sync tears it down, or counts the bad object
		}
		m.admit(&pod, true)
	}
	return nil
}

// rejectedStatus is the status kubelet writes for a pod it did not admit.
func rejectedStatus(pod *corev1.Pod, r rejection) corev1.PodStatus {
	return corev1.PodStatus{
		Phase: corev1.PodFailed, Reason: r.Reason, Message: r.Message,
		QOSClass: pod.Status.QOSClass, StartTime: pod.Status.StartTime,
	}
}
