package autonomy

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestDecide is the leader's rule, case by case: a 40 s Lease, a one-hour
// window, now at t0.
func TestDecide(t *testing.T) {
	t0 := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	ago := func(d time.Duration) time.Time { return t0.Add(-d) }
	// standIn renewed the Lease last, the edge (its holder) before.
	lease := func(renewed time.Time) *coordinationv1.Lease {
		secs, holder := int32(40), HolderStandIn
		l := &coordinationv1.Lease{Spec: coordinationv1.LeaseSpec{LeaseDurationSeconds: &secs, HolderIdentity: &holder}}
		if !renewed.IsZero() {
			rt := metav1.NewMicroTime(renewed)
			l.Spec.RenewTime = &rt
		}
		return l
	}
	cond := func(status corev1.ConditionStatus, reason string, hb time.Time) *corev1.NodeCondition {
		return &corev1.NodeCondition{Type: ConditionType, Status: status, Reason: reason, LastHeartbeatTime: metav1.NewTime(hb)}
	}
	edge := func(l *coordinationv1.Lease) *coordinationv1.Lease {
		holder := "edge-1"
		l.Spec.HolderIdentity = &holder
		return l
	}
	offline := cond(corev1.ConditionFalse, ReasonDisconnected, ago(time.Minute))
	online := cond(corev1.ConditionTrue, ReasonConnected, ago(time.Hour-time.Minute))
	for _, tc := range []struct {
		name      string
		s         seen
		untrusted bool
		want      decision
	}{
		{"offline, Lease fresh: stand in, not due", seen{cond: offline, lease: lease(ago(9 * time.Second))}, false, decision{standIn: true, since: ago(time.Minute)}},
		{"offline, Lease a quarter old: renew", seen{cond: offline, lease: lease(ago(10 * time.Second))}, false, decision{standIn: true, renew: true, since: ago(time.Minute)}},
		{"offline, never renewed: renew", seen{cond: offline, lease: lease(time.Time{})}, false, decision{standIn: true, renew: true, since: ago(time.Minute)}},
		{"offline past the window: expire", seen{cond: cond(corev1.ConditionFalse, ReasonDisconnected, ago(time.Hour+time.Second)), lease: lease(ago(time.Second))}, false, decision{expire: true, since: ago(time.Hour + time.Second)}},
		{"offline, the edge renewed since: back elsewhere", seen{cond: offline, lease: edge(lease(ago(20 * time.Second)))}, false, decision{}},
		{"offline, the edge renewed since but not lately", seen{cond: offline, lease: edge(lease(ago(21 * time.Second)))}, false, decision{standIn: true, renew: true, since: ago(time.Minute)}},
		{"expired: left alone", seen{cond: cond(corev1.ConditionFalse, ReasonExpired, ago(2*time.Hour)), lease: lease(ago(time.Hour))}, false, decision{}},
		{"offline but connected here: the session is the truth", seen{here: true, cond: offline, lease: lease(ago(time.Minute))}, false, decision{}},
		{"offline, untrusted", seen{cond: offline, lease: lease(ago(time.Minute))}, true, decision{}},
		{"offline, no Lease", seen{cond: offline}, false, decision{}},
		{"never connected (no condition)", seen{lease: lease(ago(time.Minute))}, false, decision{}},
		{"connected, the edge renews", seen{cond: online, lease: edge(lease(ago(10 * time.Second)))}, false, decision{}},
		{"connected, Lease half its duration old: may still be late", seen{cond: online, lease: lease(ago(20 * time.Second))}, false, decision{}},
		{"connected, Lease stale: no session anywhere", seen{cond: online, lease: lease(ago(21 * time.Second))}, false, decision{standIn: true, mark: true, renew: true, since: ago(21 * time.Second)}},
		{"connected, Lease stale but a replica said connected since", seen{cond: cond(corev1.ConditionTrue, ReasonConnected, ago(5*time.Second)), lease: lease(ago(time.Minute))}, false, decision{}},
		{"connected, Lease stale longer than the window", seen{cond: online, lease: lease(ago(2 * time.Hour))}, false, decision{}},
		{"connected, Lease never renewed", seen{cond: online, lease: lease(time.Time{})}, false, decision{}},
		{"connected here, Lease stale", seen{here: true, cond: online, lease: lease(ago(time.Minute))}, false, decision{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := tc.s
			s.now, s.window = t0, time.Hour
			s.trusted = !tc.untrusted
			require.Equal(t, tc.want, decide(s))
		})
	}
}
