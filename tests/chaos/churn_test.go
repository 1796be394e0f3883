package chaos

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strconv"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
)

// Pool sizes per edge: the churn creates, updates and deletes objects with
// these names. A write of a Secret is over 32 KiB with probability
// largeShare (of a ConfigMap, half that), so that on QUIC it travels on its
// own stream while the next version of the same key, or its delete, may
// take the control stream: the reordering a resend must survive. (Under
// 30 % loss a QUIC connection carries some 15 KB/s: the edges fall behind
// during the loss and catch up after it.)
const (
	poolPods    = 16
	poolConfigs = 8
	poolSecrets = 8
	largeShare  = 0.25
	largeSize   = 40 << 10
)

// versions is what the churn learnt of every object it wrote: the highest
// resourceVersion of each UID, and which UIDs it deleted. resourceVersions
// of one etcd-backed apiserver are increasing integers; the test relies on
// that to order them.
type versions struct {
	mu      sync.Mutex
	last    map[types.UID]int64
	deleted map[types.UID]bool
}

func newVersions() *versions {
	return &versions{last: map[types.UID]int64{}, deleted: map[types.UID]bool{}}
}

func (v *versions) saw(uid types.UID, rv string) {
	n, err := strconv.ParseInt(rv, 10, 64)
	if err != nil {
		return
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	v.last[uid] = max(v.last[uid], n)
}

func (v *versions) gone(uid types.UID) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.deleted[uid] = true
}

// deletedAfter returns the version that a deleted UID's removal is newer
// than, and whether the UID was deleted.
func (v *versions) deletedAfter(uid string) (int64, bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.last[types.UID(uid)], v.deleted[types.UID(uid)]
}

// churner writes the objects bound to one edge.
type churner struct {
	cs   kubernetes.Interface
	ns   string
	node string
	vers *versions
	rng  *rand.Rand

	pods    map[string]*corev1.Pod
	configs map[string]*corev1.ConfigMap
	secrets map[string]*corev1.Secret

	counts   map[string]int // "create Secret" -> successful writes
	at       []time.Time    // when each successful write returned
	failures int
	firstErr []string
	writes   map[string][]string // key -> its writes, for failure messages
}

func newChurner(cs kubernetes.Interface, ns, node string, vers *versions, seed uint64) *churner {
	return &churner{
		cs: cs, ns: ns, node: node, vers: vers, rng: rand.New(rand.NewPCG(seed, 7)),
		pods: map[string]*corev1.Pod{}, configs: map[string]*corev1.ConfigMap{}, secrets: map[string]*corev1.Secret{},
		counts: map[string]int{}, writes: map[string][]string{},
	}
}

func (c *churner) configName(i int) string { return fmt.Sprintf("%s-cm-%d", c.node, i) }
func (c *churner) secretName(i int) string { return fmt.Sprintf("%s-s-%d", c.node, i) }

// pod is a pod bound to the edge that mounts the given ConfigMaps and
// Secrets (optional: they need not exist).
func (c *churner) pod(name string, configs, secrets []int) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: c.ns, Name: name, Annotations: map[string]string{"chaos/gen": "0"}},
		Spec: corev1.PodSpec{
			NodeName:   c.node,
			Containers: []corev1.Container{{Name: "c", Image: "registry.invalid/app:1"}},
		},
	}
	yes := true
	for _, i := range configs {
		p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{Name: fmt.Sprintf("cm-%d", i), VolumeSource: corev1.VolumeSource{
			ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: c.configName(i)}, Optional: &yes},
		}})
	}
	for _, i := range secrets {
		p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{Name: fmt.Sprintf("s-%d", i), VolumeSource: corev1.VolumeSource{
			Secret: &corev1.SecretVolumeSource{SecretName: c.secretName(i), Optional: &yes},
		}})
	}
	return p
}

// anchor creates the edge's anchor pod, never deleted, which mounts every
// ConfigMap and Secret of the pool: so one of them is on the edge exactly
// while it exists, and an edge that drops one the cloud still has is wrong.
func (c *churner) anchor(ctx context.Context) error {
	all := func(n int) []int {
		out := make([]int, n)
		for i := range out {
			out[i] = i
		}
		return out
	}
	p, err := c.cs.CoreV1().Pods(c.ns).Create(ctx, c.pod(c.node+"-anchor", all(poolConfigs), all(poolSecrets)), metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create anchor pod: %w", err)
	}
	c.vers.saw(p.UID, p.ResourceVersion)
	return nil
}

// run makes one change every interval until ctx ends.
func (c *churner) run(ctx context.Context, interval time.Duration) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		// The API calls are not cut short by the end of the churn: a
		// write whose outcome is unknown would leave the model unsure.
		c.step(context.WithoutCancel(ctx))
	}
}

// during returns how many successful writes returned in [from, to).
func (c *churner) during(from, to time.Time) int {
	n := 0
	for _, t := range c.at {
		if !t.Before(from) && t.Before(to) {
			n++
		}
	}
	return n
}

func (c *churner) total() int {
	n := 0
	for _, v := range c.counts {
		n += v
	}
	return n
}

func (c *churner) failed(op string, err error) {
	c.failures++
	if len(c.firstErr) < 5 {
		c.firstErr = append(c.firstErr, fmt.Sprintf("%s: %v", op, err))
	}
}

// step creates a missing object, or updates (70 %) or deletes an existing
// one, of a kind and name picked at random.
func (c *churner) step(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	switch c.rng.IntN(3) {
	case 0:
		c.stepPod(ctx, fmt.Sprintf("%s-pod-%d", c.node, c.rng.IntN(poolPods)))
	case 1:
		c.stepConfig(ctx, c.rng.IntN(poolConfigs))
	default:
		c.stepSecret(ctx, c.rng.IntN(poolSecrets))
	}
}

// done books a successful write.
func (c *churner) done(op, kind string, m metav1.Object) {
	c.counts[op+" "+kind]++
	c.vers.saw(m.GetUID(), m.GetResourceVersion())
	c.wrote(kind, m.GetName(), fmt.Sprintf("%s %s@%s", op, m.GetUID(), m.GetResourceVersion()))
}

func (c *churner) deleted(kind, name string, uid types.UID) {
	c.counts["delete "+kind]++
	c.vers.gone(uid)
	c.wrote(kind, name, fmt.Sprintf("delete %s", uid))
}

func (c *churner) wrote(kind, name, what string) {
	c.at = append(c.at, time.Now())
	k := keyOf(kind, c.ns, name)
	c.writes[k] = append(c.writes[k], time.Now().Format("15:04:05.000")+" "+what)
}

func (c *churner) bump(m *metav1.ObjectMeta) {
	if m.Annotations == nil {
		m.Annotations = map[string]string{}
	}
	n, _ := strconv.Atoi(m.Annotations["chaos/gen"])
	m.Annotations["chaos/gen"] = strconv.Itoa(n + 1)
}

func (c *churner) stepPod(ctx context.Context, name string) {
	pods := c.cs.CoreV1().Pods(c.ns)
	cur, ok := c.pods[name]
	switch {
	case !ok:
		p, err := pods.Create(ctx, c.pod(name, []int{c.rng.IntN(poolConfigs)}, []int{c.rng.IntN(poolSecrets)}), metav1.CreateOptions{})
		if err != nil {
			c.failed("create pod "+name, err)
			c.resync(ctx, "Pod", name, nil)
			return
		}
		c.pods[name] = p
		c.done("create", "Pod", p)
	case c.rng.IntN(10) < 7:
		next := cur.DeepCopy()
		c.bump(&next.ObjectMeta)
		p, err := pods.Update(ctx, next, metav1.UpdateOptions{})
		if err != nil {
			c.failed("update pod "+name, err)
			c.resync(ctx, "Pod", name, cur)
			return
		}
		c.pods[name] = p
		c.done("update", "Pod", p)
	default:
		err := pods.Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: new(int64), Preconditions: metav1.NewUIDPreconditions(string(cur.UID))})
		if err != nil && !apierrors.IsNotFound(err) {
			c.failed("delete pod "+name, err)
			c.resync(ctx, "Pod", name, cur)
			return
		}
		delete(c.pods, name)
		c.deleted("Pod", name, cur.UID)
	}
}

func (c *churner) stepConfig(ctx context.Context, i int) {
	name := c.configName(i)
	cms := c.cs.CoreV1().ConfigMaps(c.ns)
	cur, ok := c.configs[name]
	switch {
	case !ok:
		cm, err := cms.Create(ctx, &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Namespace: c.ns, Name: name},
			Data:       map[string]string{"v": c.text(c.size(largeShare / 2))},
		}, metav1.CreateOptions{})
		if err != nil {
			c.failed("create configmap "+name, err)
			c.resync(ctx, "ConfigMap", name, nil)
			return
		}
		c.configs[name] = cm
		c.done("create", "ConfigMap", cm)
	case c.rng.IntN(10) < 7:
		next := cur.DeepCopy()
		next.Data["v"] = c.text(c.size(largeShare / 2))
		cm, err := cms.Update(ctx, next, metav1.UpdateOptions{})
		if err != nil {
			c.failed("update configmap "+name, err)
			c.resync(ctx, "ConfigMap", name, cur)
			return
		}
		c.configs[name] = cm
		c.done("update", "ConfigMap", cm)
	default:
		err := cms.Delete(ctx, name, metav1.DeleteOptions{Preconditions: metav1.NewUIDPreconditions(string(cur.UID))})
		if err != nil && !apierrors.IsNotFound(err) {
			c.failed("delete configmap "+name, err)
			c.resync(ctx, "ConfigMap", name, cur)
			return
		}
		delete(c.configs, name)
		c.deleted("ConfigMap", name, cur.UID)
	}
}

func (c *churner) stepSecret(ctx context.Context, i int) {
	name := c.secretName(i)
	size := c.size(largeShare)
	secrets := c.cs.CoreV1().Secrets(c.ns)
	cur, ok := c.secrets[name]
	switch {
	case !ok:
		s, err := secrets.Create(ctx, &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Namespace: c.ns, Name: name},
			Data:       map[string][]byte{"v": c.bytes(size)},
		}, metav1.CreateOptions{})
		if err != nil {
			c.failed("create secret "+name, err)
			c.resync(ctx, "Secret", name, nil)
			return
		}
		c.secrets[name] = s
		c.done("create", "Secret", s)
	case c.rng.IntN(10) < 7:
		next := cur.DeepCopy()
		next.Data["v"] = c.bytes(size)
		s, err := secrets.Update(ctx, next, metav1.UpdateOptions{})
		if err != nil {
			c.failed("update secret "+name, err)
			c.resync(ctx, "Secret", name, cur)
			return
		}
		c.secrets[name] = s
		c.done("update", "Secret", s)
	default:
		err := secrets.Delete(ctx, name, metav1.DeleteOptions{Preconditions: metav1.NewUIDPreconditions(string(cur.UID))})
		if err != nil && !apierrors.IsNotFound(err) {
			c.failed("delete secret "+name, err)
			c.resync(ctx, "Secret", name, cur)
			return
		}
		delete(c.secrets, name)
		c.deleted("Secret", name, cur.UID)
	}
}

// resync reads an object back after a write whose outcome is unknown, so
// that the model stays what the API server holds. prev is the object the
// model had, if any.
func (c *churner) resync(ctx context.Context, kind, name string, prev metav1.Object) {
	var obj metav1.Object
	var err error
	switch kind {
	case "Pod":
		var p *corev1.Pod
		if p, err = c.cs.CoreV1().Pods(c.ns).Get(ctx, name, metav1.GetOptions{}); err == nil {
			c.pods[name], obj = p, p
		} else if apierrors.IsNotFound(err) {
			delete(c.pods, name)
		}
	case "ConfigMap":
		var cm *corev1.ConfigMap
		if cm, err = c.cs.CoreV1().ConfigMaps(c.ns).Get(ctx, name, metav1.GetOptions{}); err == nil {
			c.configs[name], obj = cm, cm
		} else if apierrors.IsNotFound(err) {
			delete(c.configs, name)
		}
	default:
		var s *corev1.Secret
		if s, err = c.cs.CoreV1().Secrets(c.ns).Get(ctx, name, metav1.GetOptions{}); err == nil {
			c.secrets[name], obj = s, s
		} else if apierrors.IsNotFound(err) {
			delete(c.secrets, name)
		}
	}
	switch {
	case err == nil:
		c.vers.saw(obj.GetUID(), obj.GetResourceVersion())
		if prev != nil && prev.GetUID() != obj.GetUID() {
			c.vers.gone(prev.GetUID())
		}
	case apierrors.IsNotFound(err):
		if prev != nil {
			c.vers.gone(prev.GetUID())
		}
	default:
		c.failed("read back "+kind+" "+name, err)
	}
}

// size is the size of the next value: over 32 KiB with probability large.
func (c *churner) size(large float64) int {
	if c.rng.Float64() < large {
		return largeSize + c.rng.IntN(20<<10)
	}
	return 100 + c.rng.IntN(400)
}

func (c *churner) bytes(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(c.rng.Uint32())
	}
	return b
}

func (c *churner) text(n int) string {
	const letters = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, n)
	for i := range b {
		b[i] = letters[c.rng.IntN(len(letters))]
	}
	return string(b)
}
