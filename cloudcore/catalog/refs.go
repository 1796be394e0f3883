package catalog

import (
	"cmp"
	"slices"

	corev1 "k8s.io/api/core/v1"

	"github.com/tetheredge/tether/common/objsync"
)

// Kinds of the built-in objects the catalog hands out. All are in the core
// API group ("") at version v1.
const (
	kindNode      = "Node"
	kindPod       = "Pod"
	kindConfigMap = "ConfigMap"
	kindSecret    = "Secret"
)

// podRefs returns the ConfigMaps and Secrets that pod references, sorted by
// compareKeys and without duplicates. These are what the pod's node needs to
// run it and nothing more. The references are the ones the kubelet resolves
// (k8s.io/kubernetes pkg/api/v1/pod VisitPodSecretNames and
// VisitPodConfigmapNames): image pull secrets; env valueFrom and envFrom of
// init, regular and ephemeral containers; configMap, secret and projected
// volumes; and the secrets of volume plugins that take one. Optional
// references count like the others. Everything is in the pod's namespace.
//
// A pod that has finished (phase Succeeded or Failed) never starts a
// container again, so it references nothing: its node keeps the pod but
// loses the secrets only it used.
func podRefs(pod *corev1.Pod) []objsync.Key {
	if pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
		return nil
	}
	var refs []objsync.Key
	add := func(kind, name string) {
		if name != "" {
			refs = append(refs, objsync.Key{Kind: kind, Namespace: pod.Namespace, Name: name})
		}
	}
	local := func(r *corev1.LocalObjectReference) {
		if r != nil {
			add(kindSecret, r.Name)
		}
	}
	container := func(env []corev1.EnvVar, envFrom []corev1.EnvFromSource) {
		for i := range envFrom {
			if r := envFrom[i].ConfigMapRef; r != nil {
				add(kindConfigMap, r.Name)
			}
			if r := envFrom[i].SecretRef; r != nil {
				add(kindSecret, r.Name)
			}
		}
		for i := range env {
			from := env[i].ValueFrom
			if from == nil {
				continue
			}
			if r := from.ConfigMapKeyRef; r != nil {
				add(kindConfigMap, r.Name)
			}
			if r := from.SecretKeyRef; r != nil {
				add(kindSecret, r.Name)
			}
		}
	}

	spec := &pod.Spec
	for i := range spec.ImagePullSecrets {
		add(kindSecret, spec.ImagePullSecrets[i].Name)
	}
	for i := range spec.InitContainers {
		container(spec.InitContainers[i].Env, spec.InitContainers[i].EnvFrom)
	}
	for i := range spec.Containers {
		container(spec.Containers[i].Env, spec.Containers[i].EnvFrom)
	}
	for i := range spec.EphemeralContainers {
		container(spec.EphemeralContainers[i].Env, spec.EphemeralContainers[i].EnvFrom)
	}
	for i := range spec.Volumes {
		v := &spec.Volumes[i].VolumeSource
		switch {
		case v.ConfigMap != nil:
			add(kindConfigMap, v.ConfigMap.Name)
		case v.Secret != nil:
			add(kindSecret, v.Secret.SecretName)
		case v.Projected != nil:
			for j := range v.Projected.Sources {
				p := &v.Projected.Sources[j]
				if p.ConfigMap != nil {
					add(kindConfigMap, p.ConfigMap.Name)
				}
				if p.Secret != nil {
					add(kindSecret, p.Secret.Name)
				}
			}
		case v.CSI != nil:
			local(v.CSI.NodePublishSecretRef)
		case v.AzureFile != nil:
			add(kindSecret, v.AzureFile.SecretName)
		case v.CephFS != nil:
			local(v.CephFS.SecretRef)
		case v.Cinder != nil:
			local(v.Cinder.SecretRef)
		case v.FlexVolume != nil:
			local(v.FlexVolume.SecretRef)
		case v.RBD != nil:
			local(v.RBD.SecretRef)
		case v.ScaleIO != nil:
			local(v.ScaleIO.SecretRef)
		case v.ISCSI != nil:
			local(v.ISCSI.SecretRef)
		case v.StorageOS != nil:
			local(v.StorageOS.SecretRef)
		}
	}
	slices.SortFunc(refs, compareKeys)
	return slices.Compact(refs)
}

// compareKeys orders keys by group, kind, namespace and name.
func compareKeys(a, b objsync.Key) int {
	return cmp.Or(
		cmp.Compare(a.Group, b.Group),
		cmp.Compare(a.Kind, b.Kind),
		cmp.Compare(a.Namespace, b.Namespace),
		cmp.Compare(a.Name, b.Name),
	)
}
