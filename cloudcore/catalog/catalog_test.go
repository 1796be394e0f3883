package catalog

import (
	"context"
	"encoding/json"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/tests/testlog"
)

func cmEnv(name, cm string) corev1.EnvVar {
	return corev1.EnvVar{Name: name, ValueFrom: &corev1.EnvVarSource{ConfigMapKeyRef: &corev1.ConfigMapKeySelector{
		LocalObjectReference: corev1.LocalObjectReference{Name: cm}, Key: "k",
	}}}
}

func secretEnv(name, secret string, optional bool) corev1.EnvVar {
	return corev1.EnvVar{Name: name, ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{
		LocalObjectReference: corev1.LocalObjectReference{Name: secret}, Key: "k", Optional: &optional,
	}}}
}

// fixture is two edge nodes and a cloud node, with pods referencing
// ConfigMaps and Secrets in every supported way.
type fixture struct {
	*cluster
	edgeA, edgeB, cloud string
}

// wantA, wantB: what each edge node holds right after newFixture.
func (f *fixture) wantA() []objsync.Key {
	ns := f.ns
	return []objsync.Key{
		nodeKey(f.edgeA), podKey(ns, "pa"), podKey(ns, "pa2"),
		cmKey(ns, "cm-vol"), cmKey(ns, "cm-env"), cmKey(ns, "cm-envfrom"), cmKey(ns, "cm-projected"),
		cmKey(ns, "cm-init"), cmKey(ns, "cm-shared"),
		secretKey(ns, "sec-vol"), secretKey(ns, "sec-env"), secretKey(ns, "sec-envfrom"),
		secretKey(ns, "sec-projected"), secretKey(ns, "sec-pull"), secretKey(ns, "sec-csi"), secretKey(ns, "sec-a2"),
	}
}

func (f *fixture) wantB() []objsync.Key {
	ns := f.ns
	return []objsync.Key{nodeKey(f.edgeB), podKey(ns, "pb"), cmKey(ns, "cm-shared"), secretKey(ns, "sec-b")}
}

func newFixture(t *testing.T, k *cluster) *fixture {
	f := &fixture{cluster: k, edgeA: "edge-a-" + k.ns, edgeB: "edge-b-" + k.ns, cloud: "cloud-" + k.ns}
	k.node(f.edgeA, true)
	k.node(f.edgeB, true)
	k.node(f.cloud, false)
	for _, n := range []string{"vol", "env", "envfrom", "projected", "init", "shared", "cloud"} {
		k.configMap("cm-" + n)
	}
	for _, n := range []string{"vol", "env", "envfrom", "projected", "pull", "csi", "a2", "b", "cloud", "unscheduled", "unused", "ephemeral"} {
		k.secret("sec-" + n)
	}
	k.pod("pa", f.edgeA, corev1.PodSpec{
		ImagePullSecrets: []corev1.LocalObjectReference{{Name: "sec-pull"}},
		InitContainers: []corev1.Container{{
			Name: "init", Image: "example.invalid/init",
			Env: []corev1.EnvVar{cmEnv("INIT", "cm-init")},
		}},
		Containers: []corev1.Container{{
			Name: "app", Image: "example.invalid/app",
			Env: []corev1.EnvVar{
				cmEnv("A", "cm-env"), cmEnv("SHARED", "cm-shared"),
				secretEnv("B", "sec-env", false),
				secretEnv("MISSING", "sec-missing", true), // optional, does not exist yet
			},
			EnvFrom: []corev1.EnvFromSource{
				{ConfigMapRef: &corev1.ConfigMapEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "cm-envfrom"}}},
				{SecretRef: &corev1.SecretEnvSource{LocalObjectReference: corev1.LocalObjectReference{Name: "sec-envfrom"}}},
			},
		}},
		Volumes: []corev1.Volume{
			{Name: "cm", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
				LocalObjectReference: corev1.LocalObjectReference{Name: "cm-vol"}}}},
			{Name: "sec", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: "sec-vol"}}},
			{Name: "proj", VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{Sources: []corev1.VolumeProjection{
				{ConfigMap: &corev1.ConfigMapProjection{LocalObjectReference: corev1.LocalObjectReference{Name: "cm-projected"}}},
				{Secret: &corev1.SecretProjection{LocalObjectReference: corev1.LocalObjectReference{Name: "sec-projected"}}},
			}}}},
			{Name: "csi", VolumeSource: corev1.VolumeSource{CSI: &corev1.CSIVolumeSource{
				Driver: "csi.example.com", NodePublishSecretRef: &corev1.LocalObjectReference{Name: "sec-csi"}}}},
		},
	})
	// A second pod on A shares sec-vol with pa and alone uses sec-a2.
	k.pod("pa2", f.edgeA, corev1.PodSpec{
		Volumes: []corev1.Volume{
			{Name: "sec", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: "sec-vol"}}},
			{Name: "a2", VolumeSource: corev1.VolumeSource{Secret: &corev1.SecretVolumeSource{SecretName: "sec-a2"}}},
		},
	})
	k.pod("pb", f.edgeB, corev1.PodSpec{
		Containers: []corev1.Container{{Name: "app", Image: "example.invalid/app", Env: []corev1.EnvVar{secretEnv("B", "sec-b", false)}}},
		Volumes: []corev1.Volume{{Name: "cm", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
			LocalObjectReference: corev1.LocalObjectReference{Name: "cm-shared"}}}}},
	})
	k.pod("pc", f.cloud, corev1.PodSpec{
		Containers: []corev1.Container{{Name: "app", Image: "example.invalid/app",
			Env: []corev1.EnvVar{cmEnv("C", "cm-cloud"), secretEnv("S", "sec-cloud", false)}}},
	})
	k.pod("unscheduled", "", corev1.PodSpec{
		Containers: []corev1.Container{{Name: "app", Image: "example.invalid/app",
			Env: []corev1.EnvVar{secretEnv("S", "sec-unscheduled", false)}}},
	})
	return f
}

func TestMembership(t *testing.T) {
	env := cp.Env(t)
	cfg := restConfig(env)
	f := newFixture(t, &cluster{t: t, cs: clientset(t, cfg), ns: env.Namespace(t)})
	ns := f.ns

	// Everything existed before the catalog started, so WaitForSync alone
	// must make it complete: no Eventually here.
	c, _ := startCatalog(t, cfg, Config{})

	require.Equal(t, sorted(f.wantA()), sorted(c.Keys(f.edgeA)))
	require.Equal(t, sorted(f.wantB()), sorted(c.Keys(f.edgeB)))
	require.Empty(t, c.Keys(f.cloud), "a node without the edge label holds nothing")
	require.Empty(t, c.Keys("no-such-node"))

	edges := c.EdgeNodes()
	require.Contains(t, edges, f.edgeA)
	require.Contains(t, edges, f.edgeB)
	require.NotContains(t, edges, f.cloud)

	for _, node := range []string{f.edgeA, f.edgeB, f.cloud} {
		for _, key := range []objsync.Key{
			secretKey(ns, "sec-unused"),      // referenced by nobody
			secretKey(ns, "sec-unscheduled"), // referenced by an unscheduled pod only
			secretKey(ns, "sec-cloud"),       // referenced by a pod of a non-edge node only
			secretKey(ns, "sec-missing"),     // referenced, but does not exist
			podKey(ns, "unscheduled"),
			podKey(ns, "pc"),
			nodeKey(f.cloud),
		} {
			require.False(t, c.Belongs(node, key), "%s belongs to %s", key, node)
			_, ok := c.Get(node, key)
			require.False(t, ok, "Get(%s, %s)", node, key)
		}
	}
	// What only A uses is not B's, and the other way round.
	for _, key := range []objsync.Key{secretKey(ns, "sec-vol"), secretKey(ns, "sec-a2"), podKey(ns, "pa"), nodeKey(f.edgeA)} {
		require.True(t, c.Belongs(f.edgeA, key), "%s should belong to A", key)
		require.False(t, c.Belongs(f.edgeB, key), "%s belongs to B", key)
	}
	for _, key := range []objsync.Key{secretKey(ns, "sec-b"), podKey(ns, "pb"), nodeKey(f.edgeB)} {
		require.False(t, c.Belongs(f.edgeA, key), "%s belongs to A", key)
		require.True(t, c.Belongs(f.edgeB, key), "%s should belong to B", key)
	}
	require.True(t, c.Belongs(f.edgeA, cmKey(ns, "cm-shared")))
	require.True(t, c.Belongs(f.edgeB, cmKey(ns, "cm-shared")))
	// Every key Keys lists can be fetched.
	for _, node := range []string{f.edgeA, f.edgeB} {
		for _, key := range c.Keys(node) {
			obj, ok := c.Get(node, key)
			require.True(t, ok, "Get(%s, %s)", node, key)
			require.Equal(t, key, objsync.KeyOf(obj.Resource))
		}
	}
	// A key of an unknown kind belongs to nobody.
	require.False(t, c.Belongs(f.edgeA, objsync.Key{Group: "apps", Kind: "Deployment", Namespace: ns, Name: "pa"}))
}

func TestNotifications(t *testing.T) {
	env := cp.Env(t)
	cfg := restConfig(env)
	f := newFixture(t, &cluster{t: t, cs: clientset(t, cfg), ns: env.Namespace(t)})
	ns, cs, ctx := f.ns, f.cs, context.Background()
	c, rec := startCatalog(t, cfg, Config{})
	wantA := f.wantA()

	t.Run("ConfigMapUpdateNotifiesEveryReferencingNode", func(t *testing.T) {
		rec.reset()
		// cm-cloud is used by the cloud node's pod only. Its update reaches
		// the ConfigMap handler before cm-shared's, so once cm-shared is
		// notified, a notification for the cloud node would have come.
		for _, name := range []string{"cm-cloud", "cm-shared"} {
			cm, err := cs.CoreV1().ConfigMaps(ns).Get(ctx, name, metav1.GetOptions{})
			require.NoError(t, err)
			cm.Data["k"] = "changed"
			_, err = cs.CoreV1().ConfigMaps(ns).Update(ctx, cm, metav1.UpdateOptions{})
			require.NoError(t, err)
		}
		waitNotified(t, rec, f.edgeA, cmKey(ns, "cm-shared"))
		waitNotified(t, rec, f.edgeB, cmKey(ns, "cm-shared"))
		require.Empty(t, rec.forNode(f.cloud), "a non-edge node is never notified")
		require.Zero(t, rec.count(f.edgeA, cmKey(ns, "cm-cloud")))
	})

	t.Run("OptionalReferenceCountsOnceCreated", func(t *testing.T) {
		rec.reset()
		require.False(t, c.Belongs(f.edgeA, secretKey(ns, "sec-missing")))
		f.secret("sec-missing")
		waitNotified(t, rec, f.edgeA, secretKey(ns, "sec-missing"))
		require.True(t, c.Belongs(f.edgeA, secretKey(ns, "sec-missing")))
		wantA = append(wantA, secretKey(ns, "sec-missing"))
		waitKeys(t, c, f.edgeA, wantA...)
	})

	t.Run("EphemeralContainerAddsReference", func(t *testing.T) {
		rec.reset()
		pod, err := cs.CoreV1().Pods(ns).Get(ctx, "pa", metav1.GetOptions{})
		require.NoError(t, err)
		pod.Spec.EphemeralContainers = append(pod.Spec.EphemeralContainers, corev1.EphemeralContainer{
			EphemeralContainerCommon: corev1.EphemeralContainerCommon{
				Name: "debug", Image: "example.invalid/debug",
				TerminationMessagePolicy: corev1.TerminationMessageReadFile, ImagePullPolicy: corev1.PullIfNotPresent,
				EnvFrom: []corev1.EnvFromSource{{SecretRef: &corev1.SecretEnvSource{
					LocalObjectReference: corev1.LocalObjectReference{Name: "sec-ephemeral"}}}},
			},
		})
		_, err = cs.CoreV1().Pods(ns).UpdateEphemeralContainers(ctx, "pa", pod, metav1.UpdateOptions{})
		require.NoError(t, err)
		waitNotified(t, rec, f.edgeA, podKey(ns, "pa"), secretKey(ns, "sec-ephemeral"))
		wantA = append(wantA, secretKey(ns, "sec-ephemeral"))
		waitKeys(t, c, f.edgeA, wantA...)
	})

	t.Run("FinishedPodReleasesItsSecrets", func(t *testing.T) {
		rec.reset()
		pod, err := cs.CoreV1().Pods(ns).Get(ctx, "pa2", metav1.GetOptions{})
		require.NoError(t, err)
		pod.Status.Phase = corev1.PodSucceeded
		_, err = cs.CoreV1().Pods(ns).UpdateStatus(ctx, pod, metav1.UpdateOptions{})
		require.NoError(t, err)
		waitNotified(t, rec, f.edgeA, podKey(ns, "pa2"), secretKey(ns, "sec-a2"))
		wantA = slices.DeleteFunc(wantA, func(k objsync.Key) bool { return k == secretKey(ns, "sec-a2") })
		waitKeys(t, c, f.edgeA, wantA...) // pa2 stays, sec-vol stays: pa uses it
		require.Zero(t, rec.count(f.edgeA, secretKey(ns, "sec-vol")), "sec-vol still belongs to A")
	})

	t.Run("DeletedPodReleasesExclusiveReferences", func(t *testing.T) {
		rec.reset()
		f.deletePod("pb")
		waitNotified(t, rec, f.edgeB, podKey(ns, "pb"), secretKey(ns, "sec-b"), cmKey(ns, "cm-shared"))
		waitKeys(t, c, f.edgeB, nodeKey(f.edgeB))
		require.False(t, c.Belongs(f.edgeB, secretKey(ns, "sec-b")))
		_, ok := c.Get(f.edgeB, podKey(ns, "pb"))
		require.False(t, ok)
		require.True(t, c.Belongs(f.edgeA, cmKey(ns, "cm-shared")), "A's pod still uses cm-shared")
		require.Zero(t, rec.count(f.edgeA, cmKey(ns, "cm-shared")))
	})

	t.Run("RecreatedPodMovesToItsNewNode", func(t *testing.T) {
		rec.reset()
		f.pod("pb", f.edgeA, corev1.PodSpec{
			Containers: []corev1.Container{{Name: "app", Image: "example.invalid/app", Env: []corev1.EnvVar{secretEnv("B", "sec-b", false)}}},
		})
		waitNotified(t, rec, f.edgeA, podKey(ns, "pb"), secretKey(ns, "sec-b"))
		wantA = append(wantA, podKey(ns, "pb"), secretKey(ns, "sec-b"))
		waitKeys(t, c, f.edgeA, wantA...)
		require.Equal(t, []objsync.Key{nodeKey(f.edgeB)}, c.Keys(f.edgeB))
		require.Empty(t, rec.forNode(f.edgeB))
	})

	t.Run("DeletedSecretLeavesTheSet", func(t *testing.T) {
		rec.reset()
		require.NoError(t, cs.CoreV1().Secrets(ns).Delete(ctx, "sec-env", metav1.DeleteOptions{}))
		waitNotified(t, rec, f.edgeA, secretKey(ns, "sec-env"))
		require.False(t, c.Belongs(f.edgeA, secretKey(ns, "sec-env")))
		wantA = slices.DeleteFunc(wantA, func(k objsync.Key) bool { return k == secretKey(ns, "sec-env") })
		waitKeys(t, c, f.edgeA, wantA...)
	})

	t.Run("UnlabelledNodeLosesEverything", func(t *testing.T) {
		before := c.Keys(f.edgeA)
		require.ElementsMatch(t, wantA, before)
		rec.reset()
		setEdgeLabel(t, f.cluster, f.edgeA, false)
		waitNotified(t, rec, f.edgeA, before...)
		require.Empty(t, c.Keys(f.edgeA))
		require.NotContains(t, c.EdgeNodes(), f.edgeA)
		for _, key := range before {
			require.False(t, c.Belongs(f.edgeA, key), "%s", key)
		}
	})

	t.Run("RelabelledNodeGetsEverythingBack", func(t *testing.T) {
		rec.reset()
		setEdgeLabel(t, f.cluster, f.edgeA, true)
		waitNotified(t, rec, f.edgeA, wantA...)
		waitKeys(t, c, f.edgeA, wantA...)
		require.Contains(t, c.EdgeNodes(), f.edgeA)
	})

	t.Run("DeletedNode", func(t *testing.T) {
		rec.reset()
		require.NoError(t, cs.CoreV1().Nodes().Delete(ctx, f.edgeB, metav1.DeleteOptions{}))
		waitNotified(t, rec, f.edgeB, nodeKey(f.edgeB))
		require.Nil(t, c.Keys(f.edgeB))
		require.NotContains(t, c.EdgeNodes(), f.edgeB)
	})
}

// setEdgeLabel adds or removes the edge label of a node.
func setEdgeLabel(t *testing.T, k *cluster, name string, edge bool) {
	t.Helper()
	ctx := context.Background()
	node, err := k.cs.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
	require.NoError(t, err)
	if edge {
		if node.Labels == nil {
			node.Labels = map[string]string{}
		}
		node.Labels[DefaultEdgeLabel] = "yes"
	} else {
		delete(node.Labels, DefaultEdgeLabel)
	}
	_, err = k.cs.CoreV1().Nodes().Update(ctx, node, metav1.UpdateOptions{})
	require.NoError(t, err)
}

func TestData(t *testing.T) {
	env := cp.Env(t)
	cfg := restConfig(env)
	k := &cluster{t: t, cs: clientset(t, cfg), ns: env.Namespace(t)}
	ns, ctx := k.ns, context.Background()
	edge := "edge-" + ns
	k.node(edge, true)
	cm, err := k.cs.CoreV1().ConfigMaps(ns).Create(ctx, &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: "applied", Annotations: map[string]string{
			corev1.LastAppliedConfigAnnotation: `{"a huge":"copy of the object"}`,
			"example.com/kept":                 "yes",
		}},
		Data: map[string]string{"k": "v"},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	k.secret("token")
	k.pod("app", edge, corev1.PodSpec{
		Containers: []corev1.Container{{Name: "app", Image: "example.invalid/app",
			Env: []corev1.EnvVar{cmEnv("C", "applied"), secretEnv("S", "token", false)}}},
	})

	c, _ := startCatalog(t, cfg, Config{Logger: testlog.New()})

	core := k.cs.CoreV1()
	cases := []struct {
		key objsync.Key
		get func() (metav1.Object, error)
	}{
		{nodeKey(edge), func() (metav1.Object, error) { return core.Nodes().Get(ctx, edge, metav1.GetOptions{}) }},
		{podKey(ns, "app"), func() (metav1.Object, error) { return core.Pods(ns).Get(ctx, "app", metav1.GetOptions{}) }},
		{cmKey(ns, "applied"), func() (metav1.Object, error) { return core.ConfigMaps(ns).Get(ctx, "applied", metav1.GetOptions{}) }},
		{secretKey(ns, "token"), func() (metav1.Object, error) { return core.Secrets(ns).Get(ctx, "token", metav1.GetOptions{}) }},
	}
	for _, tc := range cases {
		t.Run(tc.key.Kind, func(t *testing.T) {
			live, err := tc.get()
			require.NoError(t, err)
			require.NotEmpty(t, live.GetManagedFields(), "the API server keeps managedFields")

			obj, ok := c.Get(edge, tc.key)
			require.True(t, ok)
			require.Equal(t, message.Resource{
				Version: "v1", Kind: tc.key.Kind, Namespace: tc.key.Namespace, Name: tc.key.Name, UID: string(live.GetUID()),
			}, obj.Resource)
			require.Equal(t, live.GetResourceVersion(), obj.Version)

			var data struct {
				APIVersion string         `json:"apiVersion"`
				Kind       string         `json:"kind"`
				Metadata   map[string]any `json:"metadata"`
			}
			require.NoError(t, json.Unmarshal(obj.Data, &data))
			require.Equal(t, "v1", data.APIVersion)
			require.Equal(t, tc.key.Kind, data.Kind)
			require.NotContains(t, data.Metadata, "managedFields")
			require.Equal(t, tc.key.Name, data.Metadata["name"])
			require.Equal(t, live.GetResourceVersion(), data.Metadata["resourceVersion"])
		})
	}

	t.Run("LastAppliedAnnotationDropped", func(t *testing.T) {
		obj, ok := c.Get(edge, cmKey(ns, "applied"))
		require.True(t, ok)
		var got corev1.ConfigMap
		require.NoError(t, json.Unmarshal(obj.Data, &got))
		require.Equal(t, map[string]string{"example.com/kept": "yes"}, got.Annotations)
		require.Equal(t, cm.Data, got.Data)
		require.Contains(t, cm.Annotations, corev1.LastAppliedConfigAnnotation, "the API object keeps it")
	})

	t.Run("SecondRunRefused", func(t *testing.T) {
		require.ErrorIs(t, c.Run(t.Context()), ErrAlreadyStarted)
	})
}

// TestNoRequestsAfterSync proves that answering an edge node, however
// often, costs the API server nothing: after the initial lists, the only
// traffic is the watch streams already open.
func TestNoRequestsAfterSync(t *testing.T) {
	env := cp.Env(t)
	cfg := restConfig(env)
	f := newFixture(t, &cluster{t: t, cs: clientset(t, cfg), ns: env.Namespace(t)})

	var log requestLog
	counted := rest.CopyConfig(cfg)
	counted.Wrap(log.wrap)
	c, _ := startCatalog(t, counted, Config{})
	atSync := log.requests()
	t.Logf("requests until synced (%d): %q", len(atSync), atSync)
	require.NotEmpty(t, atSync)

	const rounds = 200
	gets := 0
	for range rounds {
		for _, node := range append(c.EdgeNodes(), f.cloud) {
			for _, key := range c.Keys(node) {
				_, ok := c.Get(node, key)
				require.True(t, ok)
				require.True(t, c.Belongs(node, key))
				gets++
			}
		}
	}
	require.Positive(t, gets)
	require.Equal(t, atSync, log.requests(), "Keys, Get and Belongs made requests")
	t.Logf("%d rounds, %d Get and Belongs calls: 0 requests", rounds, gets)
}

func TestNewRejectsBadConfig(t *testing.T) {
	cs := clientset(t, restConfigNowhere())
	_, err := New(nil, Config{})
	require.ErrorIs(t, err, ErrInvalidConfig)
	_, err = New(cs, Config{EdgeLabel: "not a label!"})
	require.ErrorIs(t, err, ErrInvalidConfig)
	_, err = New(cs, Config{Sources: []Source{{}}})
	require.ErrorIs(t, err, ErrInvalidConfig)
	c, err := New(cs, Config{EdgeLabel: "example.com/edge"})
	require.NoError(t, err)
	require.Equal(t, "example.com/edge", c.edgeLabel)
}

// restConfigNowhere is for tests of New, which makes no request and so
// needs no API server.
func restConfigNowhere() *rest.Config {
	return &rest.Config{Host: "https://127.0.0.1:1"}
}
