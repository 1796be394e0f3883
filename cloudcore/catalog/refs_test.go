package catalog

import (
	"testing"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tetheredge/tether/common/objsync"
)

// TestPodRefs covers every way a pod can reference a ConfigMap or Secret.
// podRefs is a pure function of the pod; the tests against the API server
// cover the common ways end to end.
func TestPodRefs(t *testing.T) {
	ref := func(name string) corev1.LocalObjectReference { return corev1.LocalObjectReference{Name: name} }
	lref := func(name string) *corev1.LocalObjectReference { return &corev1.LocalObjectReference{Name: name} }
	vol := func(src corev1.VolumeSource) corev1.PodSpec {
		return corev1.PodSpec{Volumes: []corev1.Volume{{Name: "v", VolumeSource: src}}}
	}
	envFrom := corev1.EnvFromSource{ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: ref("cm")}}
	cases := []struct {
		name  string
		spec  corev1.PodSpec
		phase corev1.PodPhase
		cms   []string
		secs  []string
	}{
		{name: "nothing", spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "c"}}}},
		{name: "image pull secret", spec: corev1.PodSpec{ImagePullSecrets: []corev1.LocalObjectReference{ref("pull"), ref("")}}, secs: []string{"pull"}},
		{name: "env key refs", spec: corev1.PodSpec{Containers: []corev1.Container{{Env: []corev1.EnvVar{
			{Name: "plain", Value: "x"},
			cmEnv("a", "cm"), secretEnv("b", "sec", true),
			{Name: "field", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}},
		}}}}, cms: []string{"cm"}, secs: []string{"sec"}},
		{name: "envFrom", spec: corev1.PodSpec{Containers: []corev1.Container{{EnvFrom: []corev1.EnvFromSource{
			envFrom, {SecretRef: &corev1.SecretEnvSource{LocalObjectReference: ref("sec")}},
		}}}}, cms: []string{"cm"}, secs: []string{"sec"}},
		{name: "init container", spec: corev1.PodSpec{InitContainers: []corev1.Container{{EnvFrom: []corev1.EnvFromSource{envFrom}}}}, cms: []string{"cm"}},
		{name: "ephemeral container", spec: corev1.PodSpec{EphemeralContainers: []corev1.EphemeralContainer{{
			EphemeralContainerCommon: corev1.EphemeralContainerCommon{Env: []corev1.EnvVar{secretEnv("s", "sec", false)}},
		}}}, secs: []string{"sec"}},
		{name: "configMap volume", spec: vol(corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: ref("cm")}}), cms: []string{"cm"}},
		{name: "secret volume", spec: vol(corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: "sec"}}), secs: []string{"sec"}},
		{name: "projected", spec: vol(corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{Sources: []corev1.VolumeProjection{
			{ConfigMap: &corev1.ConfigMapProjection{LocalObjectReference: ref("cm")}},
			{Secret: &corev1.SecretProjection{LocalObjectReference: ref("sec")}},
			{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{Path: "token"}},
			{DownwardAPI: &corev1.DownwardAPIProjection{}},
		}}}), cms: []string{"cm"}, secs: []string{"sec"}},
		{name: "csi", spec: vol(corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{NodePublishSecretRef: lref("sec")}}), secs: []string{"sec"}},
		{name: "csi without secret", spec: vol(corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{Driver: "d"}})},
		{name: "azureFile", spec: vol(corev1.VolumeSource{AzureFile: &corev1.AzureFileVolumeSource{SecretName: "sec"}}), secs: []string{"sec"}},
		{name: "cephfs", spec: vol(corev1.VolumeSource{CephFS: &corev1.CephFSVolumeSource{SecretRef: lref("sec")}}), secs: []string{"sec"}},
		{name: "cinder", spec: vol(corev1.VolumeSource{Cinder: &corev1.CinderVolumeSource{SecretRef: lref("sec")}}), secs: []string{"sec"}},
		{name: "flexVolume", spec: vol(corev1.VolumeSource{FlexVolume: &corev1.FlexVolumeSource{SecretRef: lref("sec")}}), secs: []string{"sec"}},
		{name: "rbd", spec: vol(corev1.VolumeSource{RBD: &corev1.RBDVolumeSource{SecretRef: lref("sec")}}), secs: []string{"sec"}},
		{name: "scaleIO", spec: vol(corev1.VolumeSource{ScaleIO: &corev1.ScaleIOVolumeSource{SecretRef: lref("sec")}}), secs: []string{"sec"}},
		{name: "iscsi", spec: vol(corev1.VolumeSource{ISCSI: &corev1.ISCSIVolumeSource{SecretRef: lref("sec")}}), secs: []string{"sec"}},
		{name: "storageos", spec: vol(corev1.VolumeSource{StorageOS: &corev1.StorageOSVolumeSource{SecretRef: lref("sec")}}), secs: []string{"sec"}},
		{name: "emptyDir", spec: vol(corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}})},
		{name: "duplicates counted once", spec: corev1.PodSpec{
			ImagePullSecrets: []corev1.LocalObjectReference{ref("sec")},
			Containers:       []corev1.Container{{Env: []corev1.EnvVar{secretEnv("a", "sec", false), cmEnv("b", "cm")}, EnvFrom: []corev1.EnvFromSource{envFrom}}},
			Volumes:          []corev1.Volume{{Name: "v", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: "sec"}}}},
		}, cms: []string{"cm"}, secs: []string{"sec"}},
		{name: "succeeded pod references nothing", phase: corev1.PodSucceeded,
			spec: vol(corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: "sec"}})},
		{name: "failed pod references nothing", phase: corev1.PodFailed,
			spec: vol(corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: "sec"}})},
		{name: "running pod", phase: corev1.PodRunning,
			spec: vol(corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: "sec"}}), secs: []string{"sec"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			pod := &corev1.Pod{
				ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "p"},
				Spec:       tc.spec,
				Status:     corev1.PodStatus{Phase: tc.phase},
			}
			var want []objsync.Key
			for _, n := range tc.cms {
				want = append(want, cmKey("ns", n))
			}
			for _, n := range tc.secs {
				want = append(want, secretKey("ns", n))
			}
			require.Equal(t, want, podRefs(pod))
		})
	}
}
