package pods

import (
	"testing"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
)

func TestExclusiveCPUs(t *testing.T) {
	vm := "tether-vm"
	for _, tc := range []struct {
		name       string
		req, lim   corev1.ResourceList
		class      *string
		initLimits corev1.ResourceList
		want       int
	}{
		{name: "guaranteed, whole cores", req: rl("cpu", "2", "memory", "1Gi"), lim: rl("cpu", "2", "memory", "1Gi"), want: 2},
		{name: "limits only default the requests", lim: rl("cpu", "1", "memory", "1Gi"), want: 1},
		{name: "fractional cpu", req: rl("cpu", "1500m", "memory", "1Gi"), lim: rl("cpu", "1500m", "memory", "1Gi")},
		{name: "burstable", req: rl("cpu", "1", "memory", "512Mi"), lim: rl("cpu", "1", "memory", "1Gi")},
		{name: "no memory limit", req: rl("cpu", "1"), lim: rl("cpu", "1")},
		{name: "best effort"},
		{name: "a VM pod: its runtime asks the pool", lim: rl("cpu", "1", "memory", "1Gi"), class: &vm},
		{name: "an init container without limits makes it burstable", lim: rl("cpu", "1", "memory", "1Gi"), initLimits: corev1.ResourceList{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pod := &corev1.Pod{Spec: corev1.PodSpec{RuntimeClassName: tc.class, Containers: []corev1.Container{{
				Name: "main", Resources: corev1.ResourceRequirements{Requests: tc.req, Limits: tc.lim},
			}}}}
			if tc.initLimits != nil {
				pod.Spec.InitContainers = []corev1.Container{{Name: "init", Resources: corev1.ResourceRequirements{Limits: tc.initLimits}}}
			}
			require.Equal(t, tc.want, exclusiveCPUs(pod, &pod.Spec.Containers[0]))
		})
	}
}
