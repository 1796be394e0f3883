package pods_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/utils/cpuset"

	"github.com/tetheredge/tether/edgecore/pods"
	"github.com/tetheredge/tether/edgecore/resources"
	"github.com/tetheredge/tether/edgecore/store"
)

// The static CPU policy on real containerd and the real CPUs: a
// Guaranteed pod with one whole core gets the lowest core of its own
// (Cpus_allowed_list inside the container), a BestEffort pod running
// before it is moved off that core at once, and back onto it when the
// Guaranteed pod is deleted; the pool holds nothing then.
func TestStaticCPUPolicy(t *testing.T) {
	e := newEnv(t)
	online, err := os.ReadFile("/sys/devices/system/cpu/online")
	require.NoError(t, err)
	all, err := cpuset.Parse(strings.TrimSpace(string(online)))
	require.NoError(t, err)
	require.GreaterOrEqual(t, all.Size(), 2, "the test needs two CPUs")
	st, err := store.Open(e.ctx, filepath.Join(t.TempDir(), "pool.db"), nil)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, st.Close()) })
	pool, err := resources.New(resources.Config{CPUs: all.String(), HugepageMounts: map[int64]string{}}, st.Allocations(), nil)
	require.NoError(t, err)
	e.run(pods.Config{StaticCPUs: pool, RelistPeriod: time.Hour})

	allowed := func(p *corev1.Pod) string {
		cs := e.containers(p.UID)
		if len(cs) != 1 {
			return ""
		}
		out, err := e.sh(cs[0].GetId(), "grep Cpus_allowed_list /proc/self/status")
		if err != nil {
			return ""
		}
		return strings.TrimSpace(strings.TrimPrefix(out, "Cpus_allowed_list:"))
	}
	shared := busyboxPod(e.h, "shared", corev1.RestartPolicyAlways, true, "sleep", "3600")
	e.put(shared)
	e.waitStatus(shared, "running", running)
	require.Equal(t, all.String(), allowed(shared))

	excl := busyboxPod(e.h, "exclusive", corev1.RestartPolicyAlways, true, "sleep", "3600")
	res := corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("1"), corev1.ResourceMemory: resource.MustParse("64Mi")}
	excl.Spec.Containers[0].Resources = corev1.ResourceRequirements{Requests: res, Limits: res}
	e.put(excl)
	e.waitStatus(excl, "running", running)
	first := all.List()[0]
	rest := all.Difference(cpuset.New(first)).String()
	require.Equal(t, cpuset.New(first).String(), allowed(excl))
	// The relist is an hour away: the pool's change moves the shared pod.
	require.Eventually(t, func() bool { return allowed(shared) == rest }, 30*time.Second, 100*time.Millisecond,
		"the shared pod leaves core %d", first)

	e.deletePod(excl)
	require.Eventually(t, func() bool { return len(e.containers(excl.UID)) == 0 }, time.Minute, 100*time.Millisecond)
	require.Eventually(t, func() bool { return allowed(shared) == all.String() }, 30*time.Second, 100*time.Millisecond)
	rows, err := st.Allocations().Kind(e.ctx, "")
	require.NoError(t, err)
	require.Empty(t, rows)
}
