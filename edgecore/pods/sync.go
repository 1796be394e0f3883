package pods

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/edgecore/store"
)

// sync makes the runtime run what the store says for the pod key, and
// publishes its status. It returns when to look again (0: on the next
// event) or an error to retry with the queue's back-off.
func (m *Manager) sync(ctx context.Context, key string) (time.Duration, error) {
	ns, name := splitKey(key)
	obj, ok, err := m.st.Get(ctx, objsync.Key{Kind: "Pod", Namespace: ns, Name: name})
	if err != nil {
		return 0, fmt.Errorf("read pod: %w", err)
	}
	var pod *corev1.Pod
	if ok {
		pod = &corev1.Pod{}
		if err := json.Unmarshal(obj.Data, pod); err != nil {
			// Leave whatever runs alone: a later version of the object
			// enqueues the key again.
			m.metrics.badObjects.Inc()
			if ok, suppressed := m.lim.Allow("decode pod"); ok {
				m.logger.Warn("stored pod does not decode", "pod", key, "error", err, "suppressed", suppressed)
			}
			return 0, nil
		}
	}
	sbs, err := m.rt.ListPodSandbox(ctx, &runtimeapi.PodSandboxFilter{
		LabelSelector: map[string]string{labelPodNamespace: ns, labelPodName: name},
	})
	if err != nil {
		return 0, fmt.Errorf("list sandboxes: %w", err)
	}
	// Sandboxes of an older pod of the same name, or of a pod the store no
	// longer has, go.
	var mine []*runtimeapi.PodSandbox
	for _, sb := range sbs {
		if pod != nil && sb.GetLabels()[labelPodUID] == string(pod.UID) {
			mine = append(mine, sb)
			continue
		}
		if err := m.teardown(ctx, sb, -1); err != nil {
			return 0, err
		}
		m.finish(sb.GetLabels()[labelPodUID], true)
	}
	if pod == nil {
		m.forget(key)
		return 0, nil
	}
	m.refs.set(key, pod)
	if pod.DeletionTimestamp != nil {
		return 0, m.finishDeletion(ctx, key, pod, mine)
	}
	if r, ok := m.admit(pod, len(mine) > 0); !ok {
		if r.stored {
			return 0, nil
		}
		return 0, m.publish(ctx, key, pod, rejectedStatus(pod, r), m.lastPublished(key, pod))
	}
	return m.syncPod(ctx, key, pod, mine)
}

// teardown stops a sandbox's containers, each with grace seconds (-1: the
// grace period recorded on the container), and removes the sandbox.
func (m *Manager) teardown(ctx context.Context, sb *runtimeapi.PodSandbox, grace int64) error {
	cs, err := m.rt.ListContainers(ctx, &runtimeapi.ContainerFilter{PodSandboxId: sb.GetId()})
	if err != nil {
		return fmt.Errorf("list containers of sandbox %s: %w", sb.GetId(), err)
	}
	g, gctx := errgroup.WithContext(ctx)
	for _, c := range cs {
		if c.GetState() != runtimeapi.ContainerState_CONTAINER_RUNNING {
			continue
		}
		timeout := grace
		if timeout < 0 {
			timeout = defaultGracePeriod
			if v, err := strconv.ParseInt(c.GetAnnotations()[annotationGracePeriod], 10, 64); err == nil && v >= 0 {
				timeout = v
			}
		}
		g.Go(func() error {
			if err := m.rt.StopContainer(gctx, c.GetId(), timeout); err != nil {
				return fmt.Errorf("stop container %s: %w", c.GetId(), err)
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	if err := m.rt.StopPodSandbox(ctx, sb.GetId()); err != nil {
		return fmt.Errorf("stop sandbox %s: %w", sb.GetId(), err)
	}
	if err := m.rt.RemovePodSandbox(ctx, sb.GetId()); err != nil {
		return fmt.Errorf("remove sandbox %s: %w", sb.GetId(), err)
	}
	if err := m.releaseCPUs(ctx, sb.GetMetadata().GetUid(), cs); err != nil {
		return err
	}
	if err := m.removeVolumes(sb.GetMetadata().GetUid()); err != nil {
		return err
	}
	if err := m.tokens.drop(ctx, sb.GetMetadata().GetUid()); err != nil {
		return err
	}
	// The pod goes, and its logs with it, as kubelet removes the log
	// directories of pods that are gone (else LogDir grows with every pod
	// the node ever ran).
	if err := m.removeLogs(sb.GetMetadata()); err != nil {
		return err
	}
	m.logger.Info("pod sandbox removed", "pod", sb.GetMetadata().GetNamespace()+"/"+sb.GetMetadata().GetName(),
		"pod_uid", sb.GetMetadata().GetUid(), "sandbox", sb.GetId())
	return nil
}

// removeLogs removes the log directory of the pod of sandbox md.
func (m *Manager) removeLogs(md *runtimeapi.PodSandboxMetadata) error {
	for _, part := range []string{md.GetNamespace(), md.GetName(), md.GetUid()} {
		if part == "" || part == "." || part == ".." || strings.ContainsRune(part, '/') {
			return fmt.Errorf("remove pod logs: bad sandbox metadata %q/%q/%q", md.GetNamespace(), md.GetName(), md.GetUid())
		}
	}
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: md.GetNamespace(), Name: md.GetName(), UID: types.UID(md.GetUid())}}
	if err := os.RemoveAll(podLogDir(m.cfg.LogDir, pod)); err != nil {
		return fmt.Errorf("remove pod logs: %w", err)
	}
	return nil
}

// finishDeletion stops a pod that has a deletionTimestamp, then asks the
// cloud, once, to finish deleting it (the cloud checks the UID).
func (m *Manager) finishDeletion(ctx context.Context, key string, pod *corev1.Pod, sbs []*runtimeapi.PodSandbox) error {
	for _, sb := range sbs {
		if err := m.teardown(ctx, sb, gracePeriod(pod)); err != nil {
			return err
		}
	}
	m.prober.retain(key, nil)
	m.finish(string(pod.UID), true)
	m.mu.Lock()
	done := m.deleted[string(pod.UID)]
	m.mu.Unlock()
	if done {
		return nil
	}
	err := m.pub.Publish(ctx, store.OutboxItem{Op: message.OpDelete, Resource: podResource(pod)})
	if err != nil {
		return fmt.Errorf("publish deletion: %w", err)
	}
	m.mu.Lock()
	m.deleted[string(pod.UID)] = true
	delete(m.published, key)
	m.mu.Unlock()
	return nil
}

func (m *Manager) forget(key string) {
	m.prober.retain(key, nil)
	m.refs.drop(key)
	m.mu.Lock()
	defer m.mu.Unlock()
	if p, ok := m.published[key]; ok {
		delete(m.deleted, p.uid)
		delete(m.admission.admitted, p.uid)
		delete(m.admission.rejected, p.uid)
		delete(m.admission.finished, p.uid)
	}
	delete(m.published, key)
}

func podResource(pod *corev1.Pod) message.Resource {
	return message.Resource{Version: "v1", Kind: "Pod", Namespace: pod.Namespace, Name: pod.Name, UID: string(pod.UID)}
}

// actual is what the runtime runs for one pod.
type actual struct {
	sandbox       *runtimeapi.PodSandbox // the newest ready one, or nil
	sandboxStatus *runtimeapi.PodSandboxStatus
	// containers are every instance of each container, across the pod's
	// sandboxes, newest first.
	containers map[string][]*runtimeapi.ContainerStatus
	// sandboxOf maps container ids to their sandbox ids.
	sandboxOf map[string]string
	// volumes are the host paths of the pod's volumes, by name, once
	// prepared.
	volumes map[string]string
	// guest is the VM backend's guest info (vm.go) by container id, for
	// pods of the VM handler.
	guest map[string]string
}

func (m *Manager) observe(ctx context.Context, pod *corev1.Pod, sbs []*runtimeapi.PodSandbox) (actual, error) {
	var a actual
	for _, sb := range sbs {
		if sb.GetState() == runtimeapi.PodSandboxState_SANDBOX_READY &&
			(a.sandbox == nil || sb.GetCreatedAt() > a.sandbox.GetCreatedAt()) {
			a.sandbox = sb
		}
	}
	if a.sandbox != nil {
		resp, err := m.rt.PodSandboxStatus(ctx, a.sandbox.GetId(), false)
		if err != nil {
			return a, fmt.Errorf("read sandbox status: %w", err)
		}
		a.sandboxStatus = resp.GetStatus()
	}
	cs, err := m.rt.ListContainers(ctx, &runtimeapi.ContainerFilter{
		LabelSelector: map[string]string{labelPodUID: string(pod.UID)},
	})
	if err != nil {
		return a, fmt.Errorf("list containers: %w", err)
	}
	a.containers = make(map[string][]*runtimeapi.ContainerStatus)
	a.sandboxOf = make(map[string]string, len(cs))
	vm := m.isVM(pod)
	for _, c := range cs {
		a.sandboxOf[c.GetId()] = c.GetPodSandboxId()
		resp, err := m.rt.ContainerStatus(ctx, c.GetId(), vm)
		if err != nil {
			return a, fmt.Errorf("read container status %s: %w", c.GetId(), err)
		}
		if info, ok := resp.GetInfo()[guestInfoKey]; ok && vm {
			if a.guest == nil {
				a.guest = map[string]string{}
			}
			a.guest[c.GetId()] = info
		}
		s := resp.GetStatus()
		name := c.GetLabels()[labelContainerName]
		a.containers[name] = append(a.containers[name], s)
	}
	for _, list := range a.containers {
		sortInstances(list)
	}
	return a, nil
}

// syncPod runs the pod's sandbox, then its init containers one by one,
// then its app containers, and publishes the status.
func (m *Manager) syncPod(ctx context.Context, key string, pod *corev1.Pod, sbs []*runtimeapi.PodSandbox) (time.Duration, error) {
	a, err := m.observe(ctx, pod, sbs)
	if err != nil {
		return 0, err
	}
	var (
		after   time.Duration
		syncErr error
		waiting map[string]waitReason
	)
	// A sandbox just started gets its containers in the same sync: nothing
	// else would enqueue the pod until the relist.
	for round := 0; round < 2; round++ {
		hadSandbox := a.sandbox != nil
		waiting = map[string]waitReason{}
		var acted bool
		after, acted, syncErr = m.act(ctx, pod, sbs, &a, waiting)
		if !acted {
			break
		}
		// Look again at what the actions made, for the status.
		if sbs, err = m.rt.ListPodSandbox(ctx, &runtimeapi.PodSandboxFilter{
			LabelSelector: map[string]string{labelPodUID: string(pod.UID)},
		}); err != nil {
			return 0, errors.Join(syncErr, fmt.Errorf("list sandboxes: %w", err))
		}
		if a, err = m.observe(ctx, pod, sbs); err != nil {
			return 0, errors.Join(syncErr, err)
		}
		if hadSandbox || syncErr != nil {
			break
		}
	}
	m.trackProbes(key, pod, a)
	if err := m.publishStatus(ctx, key, pod, a, waiting); err != nil {
		return 0, errors.Join(syncErr, err)
	}
	return after, syncErr
}

// act does the next steps for the pod and records in waiting why a
// container does not run. It returns when to look again and whether it
// changed anything.
func (m *Manager) act(ctx context.Context, pod *corev1.Pod, sbs []*runtimeapi.PodSandbox, a *actual, waiting map[string]waitReason) (time.Duration, bool, error) {
	if a.sandbox == nil {
		if m.terminal(pod, a) {
			return 0, false, nil
		}
		handler, err := m.handler(pod)
		if err != nil {
			// Retried by the relist: the node's configuration may change.
			for _, c := range slices.Concat(pod.Spec.InitContainers, pod.Spec.Containers) {
				waiting[c.Name] = waitReason{Reason: "RuntimeClassNotFound", Message: err.Error()}
			}
			return 0, false, nil
		}
		if err := m.runSandbox(ctx, pod, uint32(len(sbs)), handler); err != nil {
			return 0, true, err
		}
		return 0, true, nil
	}
	volumes, refresh, err := m.prepareVolumes(ctx, pod, m.lookup(ctx, pod.Namespace))
	if err != nil {
		// Retried by the relist: the object, or the cloud that gives
		// tokens, may come later.
		reason := "ContainerCreating"
		if te := (*tokenError)(nil); errors.As(err, &te) {
			reason = reasonTokenUnavailable
		}
		for _, c := range slices.Concat(pod.Spec.InitContainers, pod.Spec.Containers) {
			waiting[c.Name] = waitReason{Reason: reason, Message: err.Error()}
		}
		if ok, suppressed := m.lim.Allow("volumes " + string(pod.UID)); ok {
			m.logger.Info("pod volumes not ready", "pod", pod.Namespace+"/"+pod.Name, "error", err, "suppressed", suppressed)
		}
		return 0, false, nil
	}
	a.volumes = volumes
	acted := false
	var after time.Duration
	next := func(d time.Duration) {
		if d > 0 && (after == 0 || d < after) {
			after = d
		}
	}
	if !refresh.IsZero() {
		// Look again when a token is due: the sync rewrites its file.
		next(max(refresh.Sub(m.cfg.TokenClock.Now()), time.Second))
	}
	for i := range pod.Spec.InitContainers {
		c := &pod.Spec.InitContainers[i]
		list := a.containers[c.Name]
		if len(list) > 0 {
			st := list[0]
			if st.GetState() == runtimeapi.ContainerState_CONTAINER_RUNNING {
				return 0, acted, nil // wait for it to finish
			}
			if st.GetState() == runtimeapi.ContainerState_CONTAINER_EXITED && st.GetExitCode() == 0 {
				continue
			}
		}
		d, did, err := m.ensureContainer(ctx, pod, a, c, waiting)
		return d, acted || did, err
	}
	var errs []error
	for i := range pod.Spec.Containers {
		d, did, err := m.ensureContainer(ctx, pod, a, &pod.Spec.Containers[i], waiting)
		acted = acted || did
		next(d)
		errs = append(errs, err)
	}
	return after, acted, errors.Join(errs...)
}

// terminal reports whether the pod has finished for good: no container
// will run again under its restart policy.
func (m *Manager) terminal(pod *corev1.Pod, a *actual) bool {
	if len(a.containers) == 0 {
		return false
	}
	for i := range pod.Spec.InitContainers {
		list := a.containers[pod.Spec.InitContainers[i].Name]
		if len(list) > 0 && list[0].GetState() == runtimeapi.ContainerState_CONTAINER_EXITED &&
			list[0].GetExitCode() != 0 && pod.Spec.RestartPolicy == corev1.RestartPolicyNever {
			return true
		}
	}
	for i := range pod.Spec.Containers {
		list := a.containers[pod.Spec.Containers[i].Name]
		if len(list) == 0 || list[0].GetState() != runtimeapi.ContainerState_CONTAINER_EXITED ||
			shouldRestart(pod.Spec.RestartPolicy, list[0].GetExitCode()) {
			return false
		}
	}
	return true
}

func shouldRestart(policy corev1.RestartPolicy, exitCode int32) bool {
	switch policy {
	case corev1.RestartPolicyNever:
		return false
	case corev1.RestartPolicyOnFailure:
		return exitCode != 0
	}
	return true
}

func (m *Manager) runSandbox(ctx context.Context, pod *corev1.Pod, attempt uint32, handler string) error {
	cfg := sandboxConfig(pod, attempt, m.cfg.LogDir)
	if err := os.MkdirAll(cfg.LogDirectory, 0o755); err != nil {
		return fmt.Errorf("create pod log directory: %w", err)
	}
	id, err := m.rt.RunPodSandbox(ctx, cfg, handler)
	if err != nil {
		return fmt.Errorf("run sandbox: %w", err)
	}
	m.logger.Info("pod sandbox started", "pod", pod.Namespace+"/"+pod.Name, "pod_uid", pod.UID, "sandbox", id)
	return nil
}

// ensureContainer makes container c run in the pod's ready sandbox when its
// restart policy and back-off allow. It returns when to look again (the end
// of a back-off) and whether it changed anything.
func (m *Manager) ensureContainer(ctx context.Context, pod *corev1.Pod, a *actual, c *corev1.Container, waiting map[string]waitReason) (time.Duration, bool, error) {
	list := a.containers[c.Name]
	attempt, step := uint32(0), 0
	if len(list) > 0 {
		latest := list[0]
		inSandbox := a.sandboxOf[latest.GetId()] == a.sandbox.GetId()
		switch latest.GetState() {
		case runtimeapi.ContainerState_CONTAINER_RUNNING:
			if h := latest.GetAnnotations()[annotationSpecHash]; h == "" || h == specHash(c) {
				killed, err := m.killFailed(ctx, pod, c, latest)
				return 0, killed, err
			}
			// The spec changed (a new image): replace the container now,
			// whatever the restart policy, as kubelet does.
			m.logger.Info("container spec changed", "pod", pod.Namespace+"/"+pod.Name, "container", c.Name)
			if err := m.rt.StopContainer(ctx, latest.GetId(), gracePeriod(pod)); err != nil {
				return 0, true, fmt.Errorf("stop changed container %s: %w", c.Name, err)
			}
		case runtimeapi.ContainerState_CONTAINER_CREATED:
			if inSandbox {
				if err := m.rt.StartContainer(ctx, latest.GetId()); err != nil {
					waiting[c.Name] = waitReason{Reason: "RunContainerError", Message: err.Error()}
					return 0, true, fmt.Errorf("start container %s: %w", c.Name, err)
				}
				return 0, true, nil
			}
		case runtimeapi.ContainerState_CONTAINER_EXITED:
			if !shouldRestart(pod.Spec.RestartPolicy, latest.GetExitCode()) {
				return 0, false, nil
			}
			prevStep, _ := strconv.Atoi(latest.GetAnnotations()[annotationBackoffStep])
			ranFor := time.Duration(latest.GetFinishedAt() - latest.GetStartedAt())
			delay, nextStep := m.backoff.delay(prevStep, ranFor)
			due := time.Unix(0, latest.GetFinishedAt()).Add(delay)
			if wait := due.Sub(m.cfg.Clock.Now()); wait > 0 {
				waiting[c.Name] = waitReason{Reason: "CrashLoopBackOff", Message: fmt.Sprintf(
					"back-off %s restarting failed container=%s pod=%s_%s(%s)", delay, c.Name, pod.Name, pod.Namespace, pod.UID)}
				return wait, false, nil
			}
			step = nextStep
		}
		attempt = latest.GetMetadata().GetAttempt() + 1
		// Keep the newest dead instance for lastState; older ones go.
		for _, old := range list[1:] {
			if old.GetState() == runtimeapi.ContainerState_CONTAINER_RUNNING {
				continue
			}
			if err := m.rt.RemoveContainer(ctx, old.GetId()); err != nil {
				return 0, true, fmt.Errorf("remove old container %s: %w", c.Name, err)
			}
		}
	}
	return 0, true, m.startContainer(ctx, pod, a, c, attempt, step, waiting)
}

func (m *Manager) startContainer(ctx context.Context, pod *corev1.Pod, a *actual, c *corev1.Container, attempt uint32, step int, waiting map[string]waitReason) error {
	handler, err := m.handler(pod)
	if err != nil {
		waiting[c.Name] = waitReason{Reason: "RuntimeClassNotFound", Message: err.Error()}
		return nil
	}
	if w, err := m.ensureImage(ctx, c, handler); err != nil {
		waiting[c.Name] = w
		return err
	} else if w.Reason != "" {
		waiting[c.Name] = w
		return nil
	}
	facts := envFacts{node: m.cfg.Node, podIP: m.podIP(pod, a.sandboxStatus)}
	if len(m.cfg.HostIPs) > 0 {
		facts.hostIP = m.cfg.HostIPs[0]
	}
	env, err := resolveEnv(pod, c, facts, m.lookup(ctx, pod.Namespace))
	if err != nil {
		waiting[c.Name] = waitReason{Reason: "CreateContainerConfigError", Message: err.Error()}
		// Retried by the relist; the referenced object may come later.
		m.logger.Info("container config incomplete", "pod", pod.Namespace+"/"+pod.Name, "container", c.Name, "error", err)
		return nil
	}
	mounts, err := containerMounts(pod, c, a.volumes, env)
	if err != nil {
		waiting[c.Name] = waitReason{Reason: "CreateContainerConfigError", Message: err.Error()}
		return nil
	}
	cfg := containerConfig(pod, c, attempt, step, env)
	cfg.Command, cfg.Args = expandCommand(c, env)
	cfg.Image.RuntimeHandler = handler
	cfg.Mounts = mounts
	if m.cfg.StaticCPUs != nil {
		if err := m.assignCPUs(ctx, pod, c, cfg); err != nil {
			waiting[c.Name] = waitReason{Reason: "CreateContainerError", Message: err.Error()}
			return fmt.Errorf("create container %s: %w", c.Name, err)
		}
	}
	sbCfg := sandboxConfig(pod, a.sandbox.GetMetadata().GetAttempt(), m.cfg.LogDir)
	id, err := m.rt.CreateContainer(ctx, a.sandbox.GetId(), cfg, sbCfg)
	if err != nil {
		waiting[c.Name] = waitReason{Reason: "CreateContainerError", Message: err.Error()}
		return fmt.Errorf("create container %s: %w", c.Name, err)
	}
	if err := m.rt.StartContainer(ctx, id); err != nil {
		waiting[c.Name] = waitReason{Reason: "RunContainerError", Message: err.Error()}
		return fmt.Errorf("start container %s: %w", c.Name, err)
	}
	m.logger.Info("container started", "pod", pod.Namespace+"/"+pod.Name, "container", c.Name, "attempt", attempt, "id", id)
	return nil
}

// ensureImage checks that c's image is present, pulling it when the pull
// policy asks for that. A non-empty reason means the container waits.
func (m *Manager) ensureImage(ctx context.Context, c *corev1.Container, handler string) (waitReason, error) {
	spec := &runtimeapi.ImageSpec{Image: c.Image, RuntimeHandler: handler}
	policy := c.ImagePullPolicy
	if policy != corev1.PullAlways {
		resp, err := m.img.ImageStatus(ctx, spec, false)
		if err != nil {
			return waitReason{Reason: "ErrImageInspect", Message: err.Error()}, fmt.Errorf("inspect image %s: %w", c.Image, err)
		}
		if resp.GetImage() != nil {
			return waitReason{}, nil
		}
		if policy == corev1.PullNever {
			return waitReason{Reason: "ErrImageNeverPull", Message: fmt.Sprintf(
				"container image %q is not present with pull policy of Never", c.Image)}, nil
		}
	}
	if _, err := m.img.PullImage(ctx, spec, nil, nil); err != nil {
		return waitReason{Reason: "ErrImagePull", Message: err.Error()}, fmt.Errorf("pull image %s: %w", c.Image, err)
	}
	return waitReason{}, nil
}

// lookup reads ConfigMaps and Secrets of namespace from the store, as
// string maps.
func (m *Manager) lookup(ctx context.Context, namespace string) lookupFunc {
	return func(kind, name string) (map[string]string, bool, error) {
		obj, ok, err := m.st.Get(ctx, objsync.Key{Kind: kind, Namespace: namespace, Name: name})
		if err != nil || !ok {
			return nil, false, err
		}
		data := map[string]string{}
		switch kind {
		case "Secret":
			var s corev1.Secret
			if err := json.Unmarshal(obj.Data, &s); err != nil {
				m.metrics.badObjects.Inc()
				return nil, false, fmt.Errorf("decode Secret %q: %w", name, err)
			}
			for k, v := range s.Data {
				data[k] = string(v)
			}
			for k, v := range s.StringData {
				data[k] = v
			}
		default:
			var cm corev1.ConfigMap
			if err := json.Unmarshal(obj.Data, &cm); err != nil {
				m.metrics.badObjects.Inc()
				return nil, false, fmt.Errorf("decode ConfigMap %q: %w", name, err)
			}
			for k, v := range cm.Data {
				data[k] = v
			}
		}
		return data, true, nil
	}
}

// published is the status last published for a pod.
type published struct {
	uid    string
	status corev1.PodStatus
	json   []byte
}

// publishStatus computes the pod's status and publishes it when it differs
// from the last one published (or, after a restart, from the stored one).
func (m *Manager) publishStatus(ctx context.Context, key string, pod *corev1.Pod, a actual, waiting map[string]waitReason) error {
	last := m.lastPublished(key, pod)
	probes := map[string]probeResult{}
	for _, list := range a.containers {
		if r, ok := m.prober.result(list[0].GetId()); ok {
			probes[list[0].GetId()] = r
		}
	}
	st := computeStatus(observation{
		pod: pod, prev: last.status, sandbox: a.sandboxStatus, containers: a.containers, probes: probes,
		waiting: waiting, hostIPs: m.cfg.HostIPs, runtimeName: m.runtimeName, now: m.cfg.Clock.Now(),
		vm: m.isVM(pod), guest: a.guest,
	})
	return m.publish(ctx, key, pod, st, last)
}

// lastPublished is the status last published for the pod, or the stored
// one after a restart or for a new UID.
func (m *Manager) lastPublished(key string, pod *corev1.Pod) published {
	m.mu.Lock()
	last, ok := m.published[key]
	m.mu.Unlock()
	if !ok || last.uid != string(pod.UID) {
		last = published{uid: string(pod.UID), status: pod.Status}
		last.json, _ = json.Marshal(pod.Status)
	}
	return last
}

// publish queues status st of pod upstream unless it equals last. A pod
// that finished for good no longer counts against admission.
func (m *Manager) publish(ctx context.Context, key string, pod *corev1.Pod, st corev1.PodStatus, last published) error {
	if st.Phase == corev1.PodSucceeded || st.Phase == corev1.PodFailed {
		m.finish(string(pod.UID), false)
	}
	data, err := json.Marshal(st)
	if err != nil {
		return fmt.Errorf("encode status: %w", err)
	}
	if bytes.Equal(data, last.json) {
		// Already published (maybe before a restart): remembered, so
		// the pod counts in tether_pods_phase.
		m.mu.Lock()
		if p, ok := m.published[key]; !ok || p.uid != last.uid {
			m.published[key] = last
		}
		m.mu.Unlock()
		return nil
	}
	if err := m.pub.Publish(ctx, store.OutboxItem{Op: message.OpStatus, Resource: podResource(pod), Data: data}); err != nil {
		return fmt.Errorf("publish status: %w", err)
	}
	m.mu.Lock()
	m.published[key] = published{uid: string(pod.UID), status: st, json: data}
	m.mu.Unlock()
	return nil
}

// podIP is the pod's first IP: the sandbox's, or the host's for a
// host-network pod.
func (m *Manager) podIP(pod *corev1.Pod, sb *runtimeapi.PodSandboxStatus) string {
	if hostNetwork(pod) {
		if len(m.cfg.HostIPs) > 0 {
			return m.cfg.HostIPs[0]
		}
		return "127.0.0.1"
	}
	return sb.GetNetwork().GetIp()
}

// trackProbes registers the pod's running containers that have probes
// with the prober, and drops the rest.
func (m *Manager) trackProbes(key string, pod *corev1.Pod, a actual) {
	keep := map[string]bool{}
	for _, c := range slices.Concat(pod.Spec.InitContainers, pod.Spec.Containers) {
		list := a.containers[c.Name]
		if !hasProbes(&c) || len(list) == 0 || list[0].GetState() != runtimeapi.ContainerState_CONTAINER_RUNNING {
			continue
		}
		id := list[0].GetId()
		keep[id] = true
		if err := m.prober.track(key, id, m.podIP(pod, a.sandboxStatus), &c, time.Unix(0, list[0].GetStartedAt())); err != nil {
			// The spec cannot work as written: counted once per container.
			m.metrics.badObjects.Inc()
			if ok, suppressed := m.lim.Allow("probes " + id); ok {
				m.logger.Warn("container probes cannot run", "pod", key, "container", c.Name, "error", err, "suppressed", suppressed)
			}
		}
	}
	m.prober.retain(key, keep)
}

// killFailed stops a running container whose startup or liveness probe
// failed; its restart policy then decides, as kubelet's does. It reports
// whether it stopped one.
func (m *Manager) killFailed(ctx context.Context, pod *corev1.Pod, c *corev1.Container, s *runtimeapi.ContainerStatus) (bool, error) {
	r, ok := m.prober.result(s.GetId())
	if !ok || r.failed == "" {
		return false, nil
	}
	m.logger.Info("container failed its probe", "pod", pod.Namespace+"/"+pod.Name, "container", c.Name, "probe", r.failed)
	if err := m.rt.StopContainer(ctx, s.GetId(), gracePeriod(pod)); err != nil {
		return true, fmt.Errorf("stop container %s after its %s probe failed: %w", c.Name, r.failed, err)
	}
	// Look again at once: the restart policy and back-off apply now.
	m.Enqueue(pod.Namespace + "/" + pod.Name)
	return true, nil
}
