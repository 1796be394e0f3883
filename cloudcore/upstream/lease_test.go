package upstream

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	coordinationv1 "k8s.io/api/coordination/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tetheredge/tether/cloudcore/dispatch"
	"github.com/tetheredge/tether/common/message"
)

func leaseMessage(t *testing.T, node, ns string, renew time.Time, seconds int32) *message.Message {
	t.Helper()
	rt := metav1.NewMicroTime(renew)
	l := coordinationv1.Lease{Spec: coordinationv1.LeaseSpec{HolderIdentity: &node, LeaseDurationSeconds: &seconds, RenewTime: &rt}}
	data, err := json.Marshal(&l)
	require.NoError(t, err)
	return &message.Message{Kind: message.KindUpstream, Op: message.OpUpsert,
		Resource: message.Resource{Group: "coordination.k8s.io", Version: "v1", Kind: "Lease", Namespace: ns, Name: node}, Payload: data}
}

// TestLeaseRenewals: a renewal costs one request and never a read; one
// that is not newer than the last written (a resend, a reordering) costs
// none; the API server's refusal of an invalid lease is final.
func TestLeaseRenewals(t *testing.T) {
	f := newFixture(t, nil, Config{})
	ctx := context.Background()
	node := nodeName(t, f.admin)
	t.Cleanup(func() {
		_ = f.admin.CoordinationV1().Leases(LeaseNamespace).Delete(context.Background(), node, metav1.DeleteOptions{})
	})
	t0 := time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)
	renewed := func() time.Time {
		l, err := f.admin.CoordinationV1().Leases(LeaseNamespace).Get(ctx, node, metav1.GetOptions{})
		require.NoError(t, err)
		return l.Spec.RenewTime.UTC()
	}
	leasePath := "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"

	require.NoError(t, f.w.Apply(ctx, node, leaseMessage(t, node, LeaseNamespace, t0, 40)))
	require.Equal(t, []string{"PATCH " + leasePath + "/" + node, "POST " + leasePath}, f.reqs.take(), "first renewal: patch, then create")
	require.Equal(t, t0, renewed())

	t1 := t0.Add(10 * time.Second)
	require.NoError(t, f.w.Apply(ctx, node, leaseMessage(t, node, LeaseNamespace, t1, 40)))
	require.Equal(t, []string{"PATCH " + leasePath + "/" + node}, f.reqs.take(), "a renewal is one patch, no read")

	require.NoError(t, f.w.Apply(ctx, node, leaseMessage(t, node, LeaseNamespace, t1, 40)), "a resend is acked")
	require.NoError(t, f.w.Apply(ctx, node, leaseMessage(t, node, LeaseNamespace, t0.Add(5*time.Second), 40)), "an older renewal is acked")
	require.Empty(t, f.reqs.take(), "renewals not newer than the last written cost no request")
	require.Equal(t, t1, renewed(), "the API server keeps the newest renewal")

	err := f.w.Apply(ctx, node, leaseMessage(t, node, LeaseNamespace, t1.Add(10*time.Second), 0))
	requireRefused(t, f, err, dispatch.ErrRejected, reasonInvalid, 0)
	require.Equal(t, t1, renewed())

	err = f.w.Apply(ctx, node, leaseMessage(t, "someone-else", LeaseNamespace, t1.Add(time.Minute), 40))
	requireRefused(t, f, err, dispatch.ErrForbidden, reasonNotOwn, 0)
	err = f.w.Apply(ctx, node, leaseMessage(t, node, "default", t1.Add(time.Minute), 40))
	requireRefused(t, f, err, dispatch.ErrForbidden, reasonNotOwn, 1)
}
