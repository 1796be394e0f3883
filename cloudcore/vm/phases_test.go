package vm

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"

	"github.com/tetheredge/tether/tests/promtest"
)

// tether_vm_phase counts the VMs by phase while the controller leads,
// follows a VM from Scheduled to Failed, and is 0 for every phase once
// the controller stopped.
func TestPhaseMetric(t *testing.T) {
	c := newClients(t)
	installRuntimeClass(t, c)
	r := start(t, c, Config{})
	byPhase := func() map[string]float64 {
		out := map[string]float64{}
		for _, p := range phases {
			v, err := promtest.Value(r.reg, "tether_vm_phase", map[string]string{"phase": string(p)})
			if err != nil {
				return nil
			}
			if v != 0 {
				out[string(p)] = v
			}
		}
		return out
	}
	for _, name := range []string{"a", "b"} {
		_, err := c.vms.Create(t.Context(), validVM(c.ns, name))
		require.NoError(t, err)
		c.waitVM(t, name, inPhase(PhaseScheduled))
	}
	require.Eventually(t, func() bool {
		m := byPhase()
		return len(m) == 1 && m["Scheduled"] == 2
	}, waitFor, 20*time.Millisecond, "two VMs Scheduled: %v", byPhase())

	c.waitPod(t, "b", "")
	c.edgeWrites(t, "b", func(s *corev1.PodStatus) { s.Phase, s.Reason = corev1.PodFailed, "OutOfcpu" })
	c.waitVM(t, "b", inPhase(PhaseFailed))
	require.Eventually(t, func() bool {
		m := byPhase()
		return len(m) == 2 && m["Scheduled"] == 1 && m["Failed"] == 1
	}, waitFor, 20*time.Millisecond, "one Scheduled, one Failed: %v", byPhase())

	r.stop(t)
	require.Empty(t, byPhase(), "a controller that does not lead counts nothing")
	require.Len(t, promtestSeries(t, r.reg), len(phases), "every phase is reported, at 0")
}

// promtestSeries returns the series of tether_vm_phase.
func promtestSeries(t *testing.T, reg *promtest.Registry) []string {
	t.Helper()
	mfs, err := reg.Gather()
	require.NoError(t, err)
	var out []string
	for _, mf := range mfs {
		if mf.GetName() == "tether_vm_phase" {
			for _, m := range mf.GetMetric() {
				out = append(out, m.GetLabel()[0].GetValue())
			}
		}
	}
	return out
}
