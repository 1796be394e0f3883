package pods

import (
	"testing"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// TestExpand checks $(VAR) expansion against the rules of kubelet's
// expansion package: $$ escapes, unknown names and unclosed references
// stay as written, nothing is expanded twice.
func TestExpand(t *testing.T) {
	vars := map[string]string{"A": "a", "B": "b", "EMPTY": "", "REF": "$(A)", "WITH SPACE": "sp"}
	for _, tc := range []struct{ in, want string }{
		{"", ""},
		{"plain", "plain"},
		{"$(A)", "a"},
		{"$(A)-$(A)", "a-a"},
		{"x$(A)y$(B)z", "xaybz"},
		{"$(EMPTY)", ""},
		{"foo$(EMPTY)bar", "foobar"},
		{"$(NOPE)", "$(NOPE)"},
		{"$(NOPE)$(A)", "$(NOPE)a"},
		{"$$(A)", "$(A)"},
		{"$$$(A)", "$a"},
		{"$$$$(A)", "$$(A)"},
		{"$$$$$$$(A)", "$$$a"},
		{"$$A", "$A"},
		{"$A", "$A"},
		{"${A}", "${A}"},
		{"$", "$"},
		{"a$", "a$"},
		{"$(A)$", "a$"},
		{"$(", "$("},
		{"$(A", "$(A"},
		{"$(B)__$(A", "b__$(A"},
		{"$(A$(B))", "$(A$(B))"},
		{"$(A$(B)", "$(A$(B)"},
		{"$(a$$b)", "$(a$$b)"},
		{"$(A $$", "$(A $"}, // an unclosed reference, then an escape
		{"--$($($(", "--$($($("},
		{"$(REF)", "$(A)"}, // not expanded again
		{"$(WITH SPACE)", "sp"},
		{`foo\$(A)`, `foo\a`},
		{"$?_$!", "$?_$!"},
		{"$中文", "$中文"},
		{"p-$€-s", "p-$€-s"},
	} {
		require.Equal(t, tc.want, expand(tc.in, vars), "expand(%q)", tc.in)
	}
}

// Env values see envFrom and the env entries before them, not those
// after; values from valueFrom and envFrom are not expanded; command and
// args see the whole environment.
func TestResolveEnvExpands(t *testing.T) {
	lookup := func(kind, name string) (map[string]string, bool, error) {
		if kind == "ConfigMap" && name == "cfg" {
			return map[string]string{"HOST": "db", "RAW": "$(HOST)"}, true, nil
		}
		return nil, false, nil
	}
	c := &corev1.Container{
		Command: []string{"sh", "-c", "echo $(URL) $$(URL) $(LATER_NOT) $(POD)"},
		Args:    []string{"--url=$(URL)", "$(MISSING)"},
		EnvFrom: []corev1.EnvFromSource{{ConfigMapRef: &corev1.ConfigMapEnvSource{
			LocalObjectReference: corev1.LocalObjectReference{Name: "cfg"}}}},
		Env: []corev1.EnvVar{
			{Name: "EARLY", Value: "$(LATER)"},
			{Name: "POD", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}},
			{Name: "URL", Value: "http://$(HOST):5432/$(POD)"},
			{Name: "LATER", Value: "late"},
			{Name: "HOST", Value: "$(HOST)-2"},
		},
	}
	pod := testPod()
	pod.Name = "$(URL)"
	kvs, err := resolveEnv(pod, c, envFacts{}, lookup)
	require.NoError(t, err)
	got := map[string]string{}
	for _, kv := range kvs {
		got[kv.Key] = string(kv.Value)
	}
	require.Equal(t, map[string]string{
		"HOST":  "db-2",
		"RAW":   "$(HOST)", // envFrom values are taken as they are
		"EARLY": "$(LATER)",
		"POD":   "$(URL)", // and so are valueFrom values
		"URL":   "http://db:5432/$(URL)",
		"LATER": "late",
	}, got)

	cmd, args := expandCommand(c, kvs)
	require.Equal(t, []string{"sh", "-c", "echo http://db:5432/$(URL) $(URL) $(LATER_NOT) $(URL)"}, cmd)
	require.Equal(t, []string{"--url=http://db:5432/$(URL)", "$(MISSING)"}, args)

	cmd, args = expandCommand(&corev1.Container{}, []*runtimeapi.KeyValue{{Key: "A", Value: []byte("a")}})
	require.Nil(t, cmd, "no command stays no command: the image's entrypoint runs")
	require.Nil(t, args)
}

// subPathExpr: every name must have a value; the result is a subPath.
func TestSubPathExpr(t *testing.T) {
	env := []*runtimeapi.KeyValue{{Key: "POD", Value: []byte("web-0")}, {Key: "EMPTY"}, {Key: "UP", Value: []byte("..")}}
	for _, tc := range []struct{ expr, want, wantErr string }{
		{expr: "logs/$(POD)", want: "logs/web-0"},
		{expr: "$$(POD)/x", want: "$(POD)/x"},
		{expr: "$(POD", want: "$(POD"},
		{expr: "$(NOPE)/$(EMPTY)/$(POD)", wantErr: `volumeMount v: subPathExpr "$(NOPE)/$(EMPTY)/$(POD)": missing value for EMPTY, NOPE`},
		{expr: "$(UP)/etc", wantErr: `volumeMount v: path "../etc" leaves the volume`},
	} {
		c := &corev1.Container{VolumeMounts: []corev1.VolumeMount{{Name: "v", MountPath: "/m", SubPathExpr: tc.expr}}}
		pod := &corev1.Pod{Spec: corev1.PodSpec{Volumes: []corev1.Volume{{Name: "v"}}}}
		mounts, err := containerMounts(pod, c, map[string]string{"v": "/host/v"}, env)
		if tc.wantErr != "" {
			require.EqualError(t, err, tc.wantErr, tc.expr)
			continue
		}
		require.NoError(t, err, tc.expr)
		require.Equal(t, "/host/v/"+tc.want, mounts[0].GetHostPath(), tc.expr)
	}
}
