package pods_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tetheredge/tether/edgecore/pods"
)

// TestProjectedAndDownwardAPIVolumes: a container reads a projected volume
// (a ConfigMap item, a Secret key with its own mode, the pod's labels and
// its memory limit) and a downwardAPI volume (one annotation). Both are
// tmpfs mounts, read-only in the container, laid out as kubelet's atomic
// writer lays them out; changing the ConfigMap and the pod's labels and
// annotations reaches the running container in place, at once: the
// relist is an hour away, so the store changes of the ConfigMap and the
// pod must bring the update.
func TestProjectedAndDownwardAPIVolumes(t *testing.T) {
	e := newEnv(t)
	e.run(pods.Config{RelistPeriod: time.Hour})
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "cfg", Namespace: "default", UID: "uid-cfg"},
		Data: map[string]string{"greeting": "hello"}}
	secret := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: "sec", Namespace: "default", UID: "uid-sec"},
		Data: map[string][]byte{"password": []byte("pw")}}
	p := busyboxPod(e.h, "projected", corev1.RestartPolicyAlways, true, "sh", "-c",
		"cat /etc/proj/cfg/greeting > /tmp/seen; exec sleep 3600")
	p.Labels = map[string]string{"app": "web", "tier": "edge"}
	p.Annotations = map[string]string{"build": "41"}
	p.Spec.Containers[0].Resources.Limits = corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("64Mi")}
	defaultMode, secretMode := int32(0o440), int32(0o400)
	p.Spec.Volumes = []corev1.Volume{
		{Name: "proj", VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{
			DefaultMode: &defaultMode,
			Sources: []corev1.VolumeProjection{
				{ConfigMap: &corev1.ConfigMapProjection{LocalObjectReference: corev1.LocalObjectReference{Name: "cfg"},
					Items: []corev1.KeyToPath{{Key: "greeting", Path: "cfg/greeting"}}}},
				{Secret: &corev1.SecretProjection{LocalObjectReference: corev1.LocalObjectReference{Name: "sec"},
					Items: []corev1.KeyToPath{{Key: "password", Path: "password", Mode: &secretMode}}}},
				{DownwardAPI: &corev1.DownwardAPIProjection{Items: []corev1.DownwardAPIVolumeFile{
					{Path: "labels", FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.labels"}},
					{Path: "mem", ResourceFieldRef: &corev1.ResourceFieldSelector{ContainerName: "main",
						Resource: "limits.memory", Divisor: resource.MustParse("1Mi")}},
				}}},
			},
		}}},
		{Name: "info", VolumeSource: corev1.VolumeSource{DownwardAPI: &corev1.DownwardAPIVolumeSource{
			Items: []corev1.DownwardAPIVolumeFile{
				{Path: "build", FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.annotations['build']"}},
				{Path: "name", FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}},
			},
		}}},
	}
	p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "proj", MountPath: "/etc/proj"}, {Name: "info", MountPath: "/etc/info"}}
	e.put(cm, secret, p)
	st := e.waitStatus(p, "running", running)
	id := strings.TrimPrefix(st.ContainerStatuses[0].ContainerID, "containerd://")
	require.Eventually(t, func() bool {
		got, err := e.sh(id, "cat /tmp/seen")
		return err == nil && got == "hello"
	}, time.Minute, 50*time.Millisecond, "the file was there when the container started")
	for cmd, want := range map[string]string{
		"cat /etc/proj/password":               "pw",
		"stat -L -c %a /etc/proj/password":     "400",
		"stat -L -c %a /etc/proj/cfg/greeting": "440",
		"cat /etc/proj/labels":                 "app=\"web\"\ntier=\"edge\"",
		"cat /etc/proj/mem":                    "64",
		"cat /etc/info/build":                  "41",
		"cat /etc/info/name":                   "projected",
		"readlink /etc/proj/password":          "..data/password",
		"ls /etc/proj":                         "cfg\nlabels\nmem\npassword",
	} {
		got, err := e.sh(id, cmd)
		require.NoError(t, err, cmd)
		require.Equal(t, want, got, cmd)
	}
	_, err := e.sh(id, "touch /etc/proj/new")
	require.Error(t, err, "a projected volume is read-only")
	for _, kind := range []string{"projected/proj", "downward-api/info"} {
		var fs unix.Statfs_t
		require.NoError(t, unix.Statfs(filepath.Join(e.dir, "pods", string(p.UID), "volumes", kind), &fs))
		require.Equal(t, int64(unix.TMPFS_MAGIC), int64(fs.Type), "%s is not on tmpfs", kind)
	}

	cm.Data["greeting"] = "bye"
	e.put(cm)
	require.Eventually(t, func() bool {
		got, err := e.sh(id, "cat /etc/proj/cfg/greeting")
		return err == nil && got == "bye"
	}, time.Minute, 50*time.Millisecond, "a ConfigMap change reaches the pods that use it")
	p.Labels["tier"] = "core"
	p.Annotations["build"] = "42"
	e.put(p)
	for cmd, want := range map[string]string{
		"cat /etc/proj/cfg/greeting": "bye",
		"cat /etc/proj/labels":       "app=\"web\"\ntier=\"core\"",
		"cat /etc/info/build":        "42",
	} {
		require.Eventually(t, func() bool {
			got, err := e.sh(id, cmd)
			return err == nil && got == want
		}, time.Minute, 50*time.Millisecond, cmd)
	}
	st, _ = e.pub.status(t, string(p.UID))
	require.Equal(t, "containerd://"+id, st.ContainerStatuses[0].ContainerID, "updated in place, not restarted")

	e.deletePod(p)
	require.Eventually(t, func() bool {
		_, err := os.Stat(filepath.Join(e.dir, "pods", string(p.UID)))
		return os.IsNotExist(err)
	}, time.Minute, 50*time.Millisecond)
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	require.NoError(t, err)
	require.NotContains(t, string(mounts), e.dir, "a volume is still mounted")
}
