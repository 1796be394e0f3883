package upstream

import (
	"context"
	"encoding/json"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
)

// podStatus writes the status of a pod bound to node, for that pod only:
// the patch carries the pod's uid as a precondition, so that a status the
// edge queued offline for a pod that was since deleted and recreated under
// the same name never lands on the new pod (the API server refuses a patch
// whose metadata.uid differs from the object's, and the write is
// rejected). The uid is the message's (m.Resource.UID, the pod the edge
// ran); a message without one is matched to the pod in the cache. It
// never decides on the cache alone that the uids differ: another replica's
// cache may be ahead of this one's, and the API server is the judge.
//
// As NodeRestriction does for kubelets, a node may not write
// status.resourceClaimStatuses (the resource claim controller's, naming
// the claims a pod may use): a status carrying them is refused.
func (w *Writer) podStatus(ctx context.Context, node string, m *message.Message) error {
	r := m.Resource
	cached, err := w.boundPod(node, r)
	if err != nil {
		return err
	}
	var st corev1.PodStatus
	if err := json.Unmarshal(m.Payload, &st); err != nil {
		return forbidden(reasonBadPayload, "node %q: pod status payload: %v", node, err)
	}
	if len(st.ResourceClaimStatuses) > 0 {
		return forbidden(reasonField, "node %q may not write status.resourceClaimStatuses of pod %s/%s", node, r.Namespace, r.Name)
	}
	uid := r.UID
	if uid == "" {
		uid = cached
	}
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{"uid": uid}, "status": st})
	if err != nil {
		return fmt.Errorf("encode pod status %s/%s: %w", r.Namespace, r.Name, err)
	}
	_, err = w.client.CoreV1().Pods(r.Namespace).Patch(ctx, r.Name, types.MergePatchType, patch,
		metav1.PatchOptions{FieldManager: w.cfg.FieldManager}, "status")
	return apiError(fmt.Sprintf("write pod status %s/%s (uid %s)", r.Namespace, r.Name, uid), err, true)
}

// boundPod returns the cached uid of the pod r if it is bound to node. A
// pod of a node the cloud does not know as an edge node yet (its
// registration is still on the way, queued behind older writes in the
// edge's outbox) is a transient refusal: the edge sends it again, and it
// is written once the Node is. Any other pod is forbidden.
func (w *Writer) boundPod(node string, r message.Resource) (string, error) {
	cached, _, ok := w.binding.Version(node, objsync.KeyOf(r))
	if ok {
		return cached, nil
	}
	if nc, isCache := w.binding.(NodeCache); isCache {
		if _, known := nc.Node(node); !known {
			return "", fmt.Errorf("node %q is not registered as an edge node yet; pod %s/%s waits for it", node, r.Namespace, r.Name)
		}
	}
	return "", forbidden(reasonNotOwn, "node %q: pod %s/%s is not bound to it", node, r.Namespace, r.Name)
}

// podDelete finishes the deletion of a pod bound to node once the edge has
// stopped it, as a kubelet does (NodeRestriction lets a node delete the
// pods bound to it): a delete with grace period 0 and the pod's uid as a
// precondition, so that it can never delete a recreated pod of the same
// name. A message without a uid is refused; a pod already gone is done.
func (w *Writer) podDelete(ctx context.Context, node string, m *message.Message) error {
	r := m.Resource
	if _, err := w.boundPod(node, r); err != nil {
		return err
	}
	if r.UID == "" {
		return forbidden(reasonNotOwn, "node %q: deleting pod %s/%s needs its uid", node, r.Namespace, r.Name)
	}
	uid := types.UID(r.UID)
	zero := int64(0)
	err := w.client.CoreV1().Pods(r.Namespace).Delete(ctx, r.Name, metav1.DeleteOptions{
		GracePeriodSeconds: &zero, Preconditions: &metav1.Preconditions{UID: &uid},
	})
	switch {
	case err == nil, apierrors.IsNotFound(err):
		return nil
	case apierrors.IsConflict(err):
		return rejected(reasonPodReplaced, fmt.Errorf("delete pod %s/%s (uid %s): %w", r.Namespace, r.Name, uid, err))
	}
	return apiError(fmt.Sprintf("delete pod %s/%s (uid %s)", r.Namespace, r.Name, uid), err, false)
}
