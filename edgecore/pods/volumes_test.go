package pods

import (
	"errors"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// readVolume returns what a container would see in dir: every top-level
// name, followed through its link, as path -> content.
func readVolume(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	for _, e := range entries {
		if e.Name()[0] == '.' {
			continue
		}
		require.NoError(t, filepath.Walk(filepath.Join(dir, e.Name()), func(p string, info os.FileInfo, err error) error {
			if err != nil {
				return err
			}
			if info.Mode()&os.ModeSymlink != 0 {
				// Walk does not follow links: look through the top one.
				target, err := filepath.EvalSymlinks(p)
				require.NoError(t, err)
				return filepath.Walk(target, func(q string, info os.FileInfo, err error) error {
					if err != nil || info.IsDir() {
						return err
					}
					rel, _ := filepath.Rel(target, q)
					data, err := os.ReadFile(q)
					out[filepath.Join(e.Name(), rel)] = string(data)
					return err
				})
			}
			if !info.IsDir() {
				rel, _ := filepath.Rel(dir, p)
				data, err := os.ReadFile(p)
				out[rel] = string(data)
				return err
			}
			return nil
		}))
	}
	return out
}

// requireFiles checks a table case: the error wantErr, or no error and
// the files want.
func requireFiles(t *testing.T, want map[string]volumeFile, wantErr string, got map[string]volumeFile, err error) {
	t.Helper()
	if wantErr != "" {
		require.EqualError(t, err, wantErr)
		return
	}
	require.NoError(t, err)
	require.Equal(t, want, got)
}

func TestWriteAtomic(t *testing.T) {
	dir := t.TempDir()
	f := func(data string, mode os.FileMode) volumeFile { return volumeFile{data: []byte(data), mode: mode} }
	gen := func() string {
		t.Helper()
		g, err := os.Readlink(filepath.Join(dir, dataLink))
		require.NoError(t, err)
		return g
	}
	require.NoError(t, writeAtomic(dir, map[string]volumeFile{"a": f("1", 0o644), "sub/b": f("2", 0o600)}))
	require.Equal(t, map[string]string{"a": "1", "sub/b": "2"}, readVolume(t, dir))
	first := gen()
	for name, want := range map[string]string{"a": "..data/a", "sub": "..data/sub"} {
		got, err := os.Readlink(filepath.Join(dir, name))
		require.NoError(t, err)
		require.Equal(t, want, got, "user-visible names are links into ..data")
	}
	info, err := os.Stat(filepath.Join(dir, "sub", "b"))
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), info.Mode().Perm())

	// The same files again: nothing is written.
	require.NoError(t, writeAtomic(dir, map[string]volumeFile{"a": f("1", 0o644), "sub/b": f("2", 0o600)}))
	require.Equal(t, first, gen())

	// A mode change alone is a new generation.
	require.NoError(t, writeAtomic(dir, map[string]volumeFile{"a": f("1", 0o640), "sub/b": f("2", 0o600)}))
	require.NotEqual(t, first, gen())
	info, err = os.Stat(filepath.Join(dir, "a"))
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o640), info.Mode().Perm())

	// New content, a key gone, a key added: one switch, old links and
	// generations swept.
	second := gen()
	require.NoError(t, writeAtomic(dir, map[string]volumeFile{"a": f("one", 0o644), "c": f("3", 0o644)}))
	require.Equal(t, map[string]string{"a": "one", "c": "3"}, readVolume(t, dir))
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	require.ElementsMatch(t, []string{"..data", gen(), "a", "c"}, names)
	require.NotEqual(t, second, gen())

	require.NoError(t, writeAtomic(dir, map[string]volumeFile{}))
	require.Empty(t, readVolume(t, dir))

	require.EqualError(t, writeAtomic(dir, map[string]volumeFile{"..data/x": f("x", 0o644)}),
		`path "..data/x": a first element starting with .. is reserved`)
}

// A directory the earlier writer left (plain files and directories) is
// taken over.
func TestWriteAtomicTakesOverPlainFiles(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "sub"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "a"), []byte("old"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "sub", "b"), []byte("old"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "gone"), []byte("old"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, ".tmp-123"), []byte("half"), 0o644))
	files := map[string]volumeFile{"a": {[]byte("new"), 0o644}, "sub/b": {[]byte("new"), 0o644}}
	require.NoError(t, writeAtomic(dir, files))
	require.Equal(t, map[string]string{"a": "new", "sub/b": "new"}, readVolume(t, dir))
	_, err := os.Lstat(filepath.Join(dir, ".tmp-123"))
	require.ErrorIs(t, err, os.ErrNotExist, "leftovers are swept")
}

// A reader that follows ..data never sees a generation with the files of
// two updates mixed, while a writer flips them.
func TestWriteAtomicReadersSeeOneGeneration(t *testing.T) {
	dir := t.TempDir()
	files := func(v string) map[string]volumeFile {
		return map[string]volumeFile{"a": {[]byte(v), 0o644}, "b": {[]byte(v), 0o644}}
	}
	require.NoError(t, writeAtomic(dir, files("0")))
	var done atomic.Bool
	var consistent, mixed atomic.Int64
	var wg sync.WaitGroup
	wg.Go(func() {
		for !done.Load() {
			gen, err := os.Readlink(filepath.Join(dir, dataLink))
			if err != nil {
				continue
			}
			a, errA := os.ReadFile(filepath.Join(dir, gen, "a"))
			b, errB := os.ReadFile(filepath.Join(dir, gen, "b"))
			switch {
			case errA != nil || errB != nil:
				// Swept under the reader: it would open ..data again.
			case string(a) == string(b):
				consistent.Add(1)
			default:
				mixed.Add(1)
			}
		}
	})
	for i := range 200 {
		require.NoError(t, writeAtomic(dir, files(string(rune('a'+i%26)))))
	}
	// Let the reader see the last generation at least once.
	require.Eventually(t, func() bool { return consistent.Load() > 0 }, 10*time.Second, time.Millisecond)
	done.Store(true)
	wg.Wait()
	require.Zero(t, mixed.Load())
}

func TestProjectedFiles(t *testing.T) {
	objects := map[string]map[string]string{
		"ConfigMap/cfg": {"greeting": "hello", "other": "x"},
		"Secret/creds":  {"token": "s3cret"},
	}
	lookup := func(kind, name string) (map[string]string, bool, error) {
		d, ok := objects[kind+"/"+name]
		return d, ok, nil
	}
	mode, itemMode := int32(0o440), int32(0o600)
	optional := true
	pod := testPod()
	pod.Labels = map[string]string{"app": "web"}
	ref := func(name string) corev1.LocalObjectReference { return corev1.LocalObjectReference{Name: name} }
	for _, tc := range []struct {
		name    string
		src     corev1.ProjectedVolumeSource
		token   tokenFunc
		want    map[string]volumeFile
		wantErr string
	}{
		{name: "three sources", src: corev1.ProjectedVolumeSource{DefaultMode: &mode, Sources: []corev1.VolumeProjection{
			{ConfigMap: &corev1.ConfigMapProjection{LocalObjectReference: ref("cfg"),
				Items: []corev1.KeyToPath{{Key: "greeting", Path: "cfg/hello"}}}},
			{Secret: &corev1.SecretProjection{LocalObjectReference: ref("creds"),
				Items: []corev1.KeyToPath{{Key: "token", Path: "token", Mode: &itemMode}}}},
			{DownwardAPI: &corev1.DownwardAPIProjection{Items: []corev1.DownwardAPIVolumeFile{
				{Path: "labels", FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.labels"}}}}},
		}}, want: map[string]volumeFile{
			"cfg/hello": {[]byte("hello"), 0o440}, "token": {[]byte("s3cret"), 0o600}, "labels": {[]byte(`app="web"`), 0o440},
		}},
		{name: "all keys, default mode", src: corev1.ProjectedVolumeSource{Sources: []corev1.VolumeProjection{
			{ConfigMap: &corev1.ConfigMapProjection{LocalObjectReference: ref("cfg")}},
		}}, want: map[string]volumeFile{"greeting": {[]byte("hello"), 0o644}, "other": {[]byte("x"), 0o644}}},
		{name: "missing optional", src: corev1.ProjectedVolumeSource{Sources: []corev1.VolumeProjection{
			{Secret: &corev1.SecretProjection{LocalObjectReference: ref("nope"), Optional: &optional}},
		}}, want: map[string]volumeFile{}},
		{name: "missing", src: corev1.ProjectedVolumeSource{Sources: []corev1.VolumeProjection{
			{Secret: &corev1.SecretProjection{LocalObjectReference: ref("nope")}},
		}}, wantErr: `source 0: Secret "nope" not found`},
		{name: "duplicate path", src: corev1.ProjectedVolumeSource{Sources: []corev1.VolumeProjection{
			{ConfigMap: &corev1.ConfigMapProjection{LocalObjectReference: ref("cfg"), Items: []corev1.KeyToPath{{Key: "greeting", Path: "x"}}}},
			{Secret: &corev1.SecretProjection{LocalObjectReference: ref("creds"), Items: []corev1.KeyToPath{{Key: "token", Path: "x"}}}},
		}}, wantErr: `source 1: path "x" is projected twice`},
		{name: "escape", src: corev1.ProjectedVolumeSource{Sources: []corev1.VolumeProjection{
			{DownwardAPI: &corev1.DownwardAPIProjection{Items: []corev1.DownwardAPIVolumeFile{
				{Path: "../x", FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}}}},
		}}, wantErr: `source 0: path "../x" leaves the volume`},
		{name: "service account token", src: corev1.ProjectedVolumeSource{DefaultMode: &mode, Sources: []corev1.VolumeProjection{
			{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{Path: "token"}},
			{ConfigMap: &corev1.ConfigMapProjection{LocalObjectReference: ref("cfg"), Items: []corev1.KeyToPath{{Key: "greeting", Path: "ca.crt"}}}},
		}}, token: func(*corev1.ServiceAccountTokenProjection) (string, error) { return "h.p.s", nil },
			want: map[string]volumeFile{"token": {[]byte("h.p.s"), 0o440}, "ca.crt": {[]byte("hello"), 0o440}}},
		{name: "no token", src: corev1.ProjectedVolumeSource{Sources: []corev1.VolumeProjection{
			{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{Path: "token"}},
		}}, token: func(*corev1.ServiceAccountTokenProjection) (string, error) { return "", errors.New("offline") },
			wantErr: `source 0: serviceAccountToken "token": offline`},
		{name: "no token requester", src: corev1.ProjectedVolumeSource{Sources: []corev1.VolumeProjection{
			{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{Path: "token"}},
		}}, wantErr: "source 0: " + errNoTokens.Error()},
		{name: "token path escapes", src: corev1.ProjectedVolumeSource{Sources: []corev1.VolumeProjection{
			{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{Path: "../token"}},
		}}, token: func(*corev1.ServiceAccountTokenProjection) (string, error) { return "h.p.s", nil },
			wantErr: `source 0: path "../token" leaves the volume`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := projectedFiles(pod, &tc.src, nil, lookup, tc.token)
			requireFiles(t, tc.want, tc.wantErr, got, err)
		})
	}
}

func TestDownwardFiles(t *testing.T) {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "ns", UID: "uid-1",
			Labels:      map[string]string{"b": "2", "a": `say "hi"`},
			Annotations: map[string]string{"note": "x\ny"}},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Resources: corev1.ResourceRequirements{
			Limits:   corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("1500m"), corev1.ResourceMemory: resource.MustParse("64Mi")},
			Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("250m")},
		}}}},
	}
	allocatable := corev1.ResourceList{corev1.ResourceEphemeralStorage: resource.MustParse("10Gi")}
	field := func(p string) *corev1.ObjectFieldSelector { return &corev1.ObjectFieldSelector{FieldPath: p} }
	res := func(c, r, div string) *corev1.ResourceFieldSelector {
		s := &corev1.ResourceFieldSelector{ContainerName: c, Resource: r}
		if div != "" {
			s.Divisor = resource.MustParse(div)
		}
		return s
	}
	mode := int32(0o400)
	for _, tc := range []struct {
		name, want, wantErr string
		item                corev1.DownwardAPIVolumeFile
	}{
		{name: "name", item: corev1.DownwardAPIVolumeFile{FieldRef: field("metadata.name")}, want: "web"},
		{name: "namespace", item: corev1.DownwardAPIVolumeFile{FieldRef: field("metadata.namespace")}, want: "ns"},
		{name: "uid", item: corev1.DownwardAPIVolumeFile{FieldRef: field("metadata.uid")}, want: "uid-1"},
		{name: "labels", item: corev1.DownwardAPIVolumeFile{FieldRef: field("metadata.labels")}, want: "a=\"say \\\"hi\\\"\"\nb=\"2\""},
		{name: "annotations", item: corev1.DownwardAPIVolumeFile{FieldRef: field("metadata.annotations")}, want: `note="x\ny"`},
		{name: "one label", item: corev1.DownwardAPIVolumeFile{FieldRef: field("metadata.labels['b']")}, want: "2"},
		{name: "absent label", item: corev1.DownwardAPIVolumeFile{FieldRef: field("metadata.labels['zzz']")}, want: ""},
		{name: "cpu limit in cores, rounded up", item: corev1.DownwardAPIVolumeFile{ResourceFieldRef: res("app", "limits.cpu", "")}, want: "2"},
		{name: "cpu limit in millicores", item: corev1.DownwardAPIVolumeFile{ResourceFieldRef: res("app", "limits.cpu", "1m")}, want: "1500"},
		{name: "cpu request", item: corev1.DownwardAPIVolumeFile{ResourceFieldRef: res("app", "requests.cpu", "1m")}, want: "250"},
		{name: "memory limit in Mi", item: corev1.DownwardAPIVolumeFile{ResourceFieldRef: res("app", "limits.memory", "1Mi")}, want: "64"},
		{name: "memory request unset", item: corev1.DownwardAPIVolumeFile{ResourceFieldRef: res("app", "requests.memory", "")}, want: "0"},
		{name: "unset limit is the node's allocatable", item: corev1.DownwardAPIVolumeFile{
			ResourceFieldRef: res("app", "limits.ephemeral-storage", "1Gi")}, want: "10"},
		{name: "no such container", item: corev1.DownwardAPIVolumeFile{ResourceFieldRef: res("db", "limits.cpu", "")},
			wantErr: `item "f": resourceFieldRef: no container "db" in the pod`},
		{name: "unsupported resource", item: corev1.DownwardAPIVolumeFile{ResourceFieldRef: res("app", "limits.nvidia.com/gpu", "")},
			wantErr: `item "f": resourceFieldRef "limits.nvidia.com/gpu" is not supported`},
		{name: "unsupported field", item: corev1.DownwardAPIVolumeFile{FieldRef: field("status.podIP")},
			wantErr: `item "f": fieldRef "status.podIP" is not supported`},
		{name: "subscript on another field", item: corev1.DownwardAPIVolumeFile{FieldRef: field("metadata.name['x']")},
			wantErr: `item "f": fieldRef "metadata.name['x']": only metadata.labels and metadata.annotations take a key`},
		{name: "neither", item: corev1.DownwardAPIVolumeFile{}, wantErr: `item "f": a fieldRef or resourceFieldRef is required`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.item.Path = "f"
			got, err := downwardFiles(pod, []corev1.DownwardAPIVolumeFile{tc.item}, &mode, allocatable)
			requireFiles(t, map[string]volumeFile{"f": {[]byte(tc.want), 0o400}}, tc.wantErr, got, err)
		})
	}
}

func TestObjectRefs(t *testing.T) {
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "web"}, Spec: corev1.PodSpec{
		Volumes: []corev1.Volume{
			{VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: "cfg"}}}},
			{VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: "sec"}}},
			{VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{Sources: []corev1.VolumeProjection{
				{ConfigMap: &corev1.ConfigMapProjection{LocalObjectReference: corev1.LocalObjectReference{Name: "cfg"}}},
				{Secret: &corev1.SecretProjection{LocalObjectReference: corev1.LocalObjectReference{Name: "proj-sec"}}},
			}}}},
		},
		InitContainers: []corev1.Container{{EnvFrom: []corev1.EnvFromSource{{SecretRef: &corev1.SecretEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "init-sec"}}}}}},
		Containers: []corev1.Container{{Env: []corev1.EnvVar{{Name: "X", ValueFrom: &corev1.EnvVarSource{
			ConfigMapKeyRef: &corev1.ConfigMapKeySelector{LocalObjectReference: corev1.LocalObjectReference{Name: "env-cfg"}, Key: "k"}}}}}},
	}}
	require.Equal(t, []string{"ConfigMap/ns/cfg", "Secret/ns/sec", "Secret/ns/proj-sec", "Secret/ns/init-sec", "ConfigMap/ns/env-cfg"}, podObjects(pod))

	var r objectRefs
	require.Empty(t, r.pods("ConfigMap", "ns", "cfg"), "the zero value is ready")
	r.set("ns/web", pod)
	r.set("ns/other", &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "ns"}, Spec: corev1.PodSpec{Volumes: pod.Spec.Volumes[:1]}})
	require.ElementsMatch(t, []string{"ns/web", "ns/other"}, r.pods("ConfigMap", "ns", "cfg"))
	require.Equal(t, []string{"ns/web"}, r.pods("ConfigMap", "ns", "env-cfg"))
	require.Empty(t, r.pods("ConfigMap", "other-ns", "cfg"), "objects are per namespace")
	require.Empty(t, r.pods("Secret", "ns", "cfg"), "and per kind")
	r.set("ns/web", &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "ns"}})
	require.Equal(t, []string{"ns/other"}, r.pods("ConfigMap", "ns", "cfg"), "a new version of the pod replaces its references")
	r.drop("ns/other")
	require.Empty(t, r.pods("ConfigMap", "ns", "cfg"))
	require.Empty(t, r.byObj)
}
