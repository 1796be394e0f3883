package vm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"
	"golang.org/x/time/rate"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	"github.com/tetheredge/tether/common/ratelog"
)

// Defaults of Config.
const (
	DefaultWorkers = 2
	DefaultResync  = 10 * time.Minute
)

// The retry policy of every sync, in one place: a failed key is retried
// after 50 ms, doubling to at most a minute, and all retries together stay
// under 20 a second (burst 100), so a broken API server is not hammered.
const (
	retryBase  = 50 * time.Millisecond
	retryMax   = time.Minute
	retryQPS   = 20
	retryBurst = 100
)

// Config configures the controller. Zero values mean the defaults beside
// each field.
type Config struct {
	// Namespace limits the controller to one namespace. Default: all.
	Namespace string
	// Workers is how many keys are synced at once. Default DefaultWorkers.
	Workers int
	// Resync is the informers' resync period: every VM is synced again
	// this often even without an event. Default DefaultResync.
	Resync time.Duration
	// BaseOverhead is the fixed part of QEMU's memory overhead, in bytes
	// (see DefaultBaseOverhead). Default DefaultBaseOverhead.
	BaseOverhead int64
	// FieldManager names the controller's writes. Default
	// "tether-vm-controller".
	FieldManager string
	// LeaderElection makes one controller of several act.
	LeaderElection LeaderElection
	// Now defaults to time.Now.
	Now func() time.Time
	// Logger defaults to a discard logger.
	Logger *slog.Logger
	// Registerer, when set, gets the controller's metrics.
	Registerer prometheus.Registerer
}

// Controller turns VirtualMachines into pods and mirrors the pods' status.
// Build it with New; Run it once.
//
// Invariants: each VM has at most one pod, named PodName(vm), controlled by
// it (ownerReference with controller=true and the VM's UID); the
// controller deletes only pods a VirtualMachine controls, with the pod's
// UID as a precondition; it writes a VM's status only when it differs
// from the one in its cache.
type Controller struct {
	cfg    Config
	kube   kubernetes.Interface
	dyn    dynamic.Interface
	vms    *Client
	logger *slog.Logger
	lim    *ratelog.Limiter

	syncs       *prometheus.CounterVec
	podWrites   *prometheus.CounterVec
	statusWrite prometheus.Counter
	badInput    *prometheus.CounterVec
	leader      prometheus.Gauge
	phases      *phaseCollector
}

// New returns a controller that writes pods through kube and
// VirtualMachines through dyn.
func New(kube kubernetes.Interface, dyn dynamic.Interface, cfg Config) (*Controller, error) {
	if kube == nil || dyn == nil {
		return nil, errors.New("vm: a Kubernetes client and a dynamic client are required")
	}
	if cfg.Workers <= 0 {
		cfg.Workers = DefaultWorkers
	}
	if cfg.Resync <= 0 {
		cfg.Resync = DefaultResync
	}
	if cfg.BaseOverhead <= 0 {
		cfg.BaseOverhead = DefaultBaseOverhead
	}
	if cfg.FieldManager == "" {
		cfg.FieldManager = "tether-vm-controller"
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	le, err := withDefaults(cfg.LeaderElection)
	if err != nil {
		return nil, err
	}
	cfg.LeaderElection = le
	c := &Controller{
		cfg: cfg, kube: kube, dyn: dyn, vms: NewClient(dyn),
		logger: cfg.Logger.With("component", "vm-controller"),
		lim:    ratelog.New(0, cfg.Now),
		syncs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_vm_syncs_total", Help: "VirtualMachine syncs, by result (ok, conflict: raced another write, or error; both retried with back-off).",
		}, []string{"result"}),
		podWrites: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_vm_pod_writes_total", Help: "Pods of VirtualMachines created or deleted, by op.",
		}, []string{"op"}),
		statusWrite: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tether_vm_status_writes_total", Help: "VirtualMachine status updates written.",
		}),
		badInput: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tether_vm_bad_input_total", Help: "VirtualMachines or VM pod statuses refused or cut, by cause.",
		}, []string{"cause"}),
		leader: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tether_vm_controller_leader", Help: "1 while this CloudCore's VM controller is the leader and acts.",
		}),
		phases: newPhaseCollector(),
	}
	if cfg.Registerer != nil {
		for _, m := range []prometheus.Collector{c.syncs, c.podWrites, c.statusWrite, c.badInput, c.leader, c.phases} {
			if err := cfg.Registerer.Register(m); err != nil {
				return nil, fmt.Errorf("register vm controller metrics: %w", err)
			}
		}
	}
	return c, nil
}

// Run runs the controller until ctx ends: behind the leader election, or
// at once when it is disabled.
func (c *Controller) Run(ctx context.Context) error {
	if c.cfg.LeaderElection.Disabled {
		return c.lead(ctx)
	}
	return c.elect(ctx)
}

// term is one stretch of leadership: its own informers and queue, so a
// lost lease leaves nothing behind.
type term struct {
	*Controller
	queue workqueue.TypedRateLimitingInterface[string]
	vmLst cache.GenericLister
	pods  corelisters.PodLister
}

// lead acts until ctx ends: informers on VMs and their pods feed a
// rate-limited queue of VM keys that the workers sync.
func (c *Controller) lead(ctx context.Context) error {
	c.leader.Set(1)
	defer c.leader.Set(0)
	c.logger.Info("vm controller started", "namespace", c.cfg.Namespace)
	limiter := workqueue.NewTypedMaxOfRateLimiter(
		workqueue.NewTypedItemExponentialFailureRateLimiter[string](retryBase, retryMax),
		&workqueue.TypedBucketRateLimiter[string]{Limiter: rate.NewLimiter(rate.Limit(retryQPS), retryBurst)},
	)
	t := &term{Controller: c, queue: workqueue.NewTypedRateLimitingQueueWithConfig(limiter,
		workqueue.TypedRateLimitingQueueConfig[string]{Name: "virtualmachines"})}
	defer t.queue.ShutDown()

	vmf := dynamicinformer.NewFilteredDynamicSharedInformerFactory(c.dyn, c.cfg.Resync, namespaceOrAll(c.cfg.Namespace), nil)
	vmInf := vmf.ForResource(GVR)
	t.vmLst = vmInf.Lister()
	c.phases.set(t.vmLst)
	defer c.phases.set(nil)
	podf := informers.NewSharedInformerFactoryWithOptions(c.kube, c.cfg.Resync,
		informers.WithNamespace(namespaceOrAll(c.cfg.Namespace)),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = LabelName }))
	podInf := podf.Core().V1().Pods()
	t.pods = podInf.Lister()
	if _, err := vmInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    t.enqueueVM,
		UpdateFunc: func(_, obj any) { t.enqueueVM(obj) },
		DeleteFunc: t.enqueueVM,
	}); err != nil {
		return fmt.Errorf("watch virtual machines: %w", err)
	}
	if _, err := podInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    t.enqueuePod,
		UpdateFunc: func(_, obj any) { t.enqueuePod(obj) },
		DeleteFunc: t.enqueuePod,
	}); err != nil {
		return fmt.Errorf("watch virtual machine pods: %w", err)
	}
	vmf.Start(ctx.Done())
	podf.Start(ctx.Done())
	defer vmf.Shutdown()
	defer podf.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), vmInf.Informer().HasSynced, podInf.Informer().HasSynced) {
		return nil // ctx ended
	}
	g, ctx := errgroup.WithContext(ctx)
	for range c.cfg.Workers {
		g.Go(func() error {
			for t.next(ctx) {
			}
			return nil
		})
	}
	<-ctx.Done()
	t.queue.ShutDown()
	return g.Wait()
}

func namespaceOrAll(ns string) string {
	if ns == "" {
		return metav1.NamespaceAll
	}
	return ns
}

func (t *term) enqueueVM(obj any) {
	key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj)
	if err == nil {
		t.queue.Add(key)
	}
}

// enqueuePod queues the VM that controls the pod; other pods are ignored.
func (t *term) enqueuePod(obj any) {
	if tomb, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = tomb.Obj
	}
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	if ref := controllerOf(pod); ref != nil {
		t.queue.Add(pod.Namespace + "/" + ref.Name)
	}
}

// next syncs one key; false once the queue is shut down.
func (t *term) next(ctx context.Context) bool {
	key, quit := t.queue.Get()
	if quit {
		return false
	}
	defer t.queue.Done(key)
	if err := t.sync(ctx, key); err != nil {
		switch {
		case apierrors.IsConflict(err):
			// The cache was behind a write; the retry reads the newer object.
			t.syncs.WithLabelValues("conflict").Inc()
			t.logger.Debug("sync virtual machine raced a write", "vm", key, "err", err)
		case ctx.Err() == nil:
			t.syncs.WithLabelValues("error").Inc()
			t.logger.Warn("sync virtual machine failed", "vm", key, "retries", t.queue.NumRequeues(key), "err", err)
		}
		t.queue.AddRateLimited(key)
		return true
	}
	t.syncs.WithLabelValues("ok").Inc()
	t.queue.Forget(key)
	return true
}

// sync makes key's pod what its VM asks for and writes the VM's status.
func (t *term) sync(ctx context.Context, key string) error {
	ns, name, err := cache.SplitMetaNamespaceKey(key)
	if err != nil {
		return nil // not a key this controller queued
	}
	obj, err := t.vmLst.ByNamespace(ns).Get(name)
	if apierrors.IsNotFound(err) {
		return t.orphans(ctx, ns, name)
	}
	if err != nil {
		return fmt.Errorf("read virtual machine %s: %w", key, err)
	}
	u, ok := obj.(*unstructured.Unstructured)
	if !ok {
		return fmt.Errorf("read virtual machine %s: unexpected %T in cache", key, obj)
	}
	v, err := FromUnstructured(u)
	if err != nil {
		// Only a schema older than this controller lets that through;
		// retrying cannot help until the object changes.
		t.refuse(key, "undecodable", err)
		return nil
	}
	pod, err := t.pods.Pods(ns).Get(PodName(name))
	if apierrors.IsNotFound(err) {
		pod = nil
	} else if err != nil {
		return fmt.Errorf("read pod of virtual machine %s: %w", key, err)
	}
	var obs observation
	wait := false // a pod of an earlier VM of this name is going
	if pod != nil {
		if ref := controllerOf(pod); ref == nil || ref.UID != v.UID {
			if ref != nil {
				// A pod of an earlier VirtualMachine of this name: it
				// goes, and this one's pod is made once it is gone.
				wait = true
				if pod.DeletionTimestamp == nil {
					obs.writeErr = t.deletePod(ctx, pod, "stale owner")
				}
			} else {
				obs.conflict = fmt.Sprintf("pod %s/%s exists and is not controlled by this VirtualMachine", ns, pod.Name)
			}
			pod = nil
		}
	}
	want, specErr := buildPod(v, t.cfg.BaseOverhead)
	obs.specErr = specErr
	if specErr != nil {
		t.refuse(key, "invalid_spec", specErr)
	}
	if obs.conflict != "" {
		t.refuse(key, "pod_conflict", errors.New(obs.conflict))
	}
	switch {
	case wait || obs.conflict != "" || obs.writeErr != nil:
	case pod != nil && !v.Spec.IsRunning():
		if pod.DeletionTimestamp == nil {
			obs.writeErr = t.deletePod(ctx, pod, "running is false")
		}
	case pod == nil && v.Spec.IsRunning() && specErr == nil:
		obs.conflict, obs.writeErr = t.createPod(ctx, want, v)
		if obs.conflict != "" {
			t.refuse(key, "pod_conflict", errors.New(obs.conflict))
		}
	case pod != nil && specErr == nil && pod.Annotations[AnnotationSpecHash] != want.Annotations[AnnotationSpecHash]:
		if pod.Status.Phase == corev1.PodFailed || pod.Status.Phase == corev1.PodSucceeded {
			if pod.DeletionTimestamp == nil {
				obs.writeErr = t.deletePod(ctx, pod, "spec changed after the pod ended")
			}
		} else {
			obs.restartRequired = true
		}
	}
	st, causes := computeStatus(v, pod, obs, t.cfg.Now())
	for _, cause := range causes {
		t.refuse(key, cause, errors.New("the edge's VM pod status is not the contract's"))
	}
	if !equality.Semantic.DeepEqual(st, v.Status) {
		nv := *v // decoded from the cache's object: a copy of its own
		nv.Status = st
		if _, err := t.vms.UpdateStatus(ctx, &nv); err != nil {
			return errors.Join(obs.writeErr, fmt.Errorf("write status of virtual machine %s: %w", key, err))
		}
		t.statusWrite.Inc()
	}
	if obs.conflict != "" {
		// The other pod may go away without an event this controller sees.
		return errors.New(obs.conflict)
	}
	return obs.writeErr
}

// createPod creates want. A pod of that name that v does not control is a
// conflict (returned as its message), not an error.
func (t *term) createPod(ctx context.Context, want *corev1.Pod, v *VirtualMachine) (string, error) {
	_, err := t.kube.CoreV1().Pods(want.Namespace).Create(ctx, want, metav1.CreateOptions{FieldManager: t.cfg.FieldManager})
	if apierrors.IsAlreadyExists(err) {
		live, gerr := t.kube.CoreV1().Pods(want.Namespace).Get(ctx, want.Name, metav1.GetOptions{})
		if gerr != nil {
			return "", fmt.Errorf("read pod %s/%s: %w", want.Namespace, want.Name, gerr)
		}
		if ref := controllerOf(live); ref != nil && ref.UID == v.UID {
			return "", nil // the cache is behind; its event is coming
		}
		return fmt.Sprintf("pod %s/%s exists and is not controlled by this VirtualMachine", want.Namespace, want.Name), nil
	}
	if err != nil {
		return "", fmt.Errorf("create pod %s/%s: %w", want.Namespace, want.Name, err)
	}
	t.podWrites.WithLabelValues("create").Inc()
	t.logger.Info("vm pod created", "vm", v.Namespace+"/"+v.Name, "pod", want.Name, "node", want.Spec.NodeName)
	return "", nil
}

// deletePod deletes pod, only if it is still the one read (its UID).
func (t *term) deletePod(ctx context.Context, pod *corev1.Pod, why string) error {
	err := t.kube.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &pod.UID}})
	if apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
		return nil // gone already, or another pod now: the next round sees it
	}
	if err != nil {
		return fmt.Errorf("delete pod %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	t.podWrites.WithLabelValues("delete").Inc()
	t.logger.Info("vm pod deleted", "pod", pod.Namespace+"/"+pod.Name, "reason", why)
	return nil
}

// orphans deletes the pods of a VirtualMachine that is gone. The garbage
// collector does it too (the pods have an ownerReference); doing it here
// means a cluster without one, and a controller restarted after the
// delete, leave no VM running.
func (t *term) orphans(ctx context.Context, ns, name string) error {
	pods, err := t.pods.Pods(ns).List(labels.SelectorFromSet(labels.Set{LabelName: name}))
	if err != nil {
		return fmt.Errorf("list pods of virtual machine %s/%s: %w", ns, name, err)
	}
	var errs []error
	for _, pod := range pods {
		if ref := controllerOf(pod); ref != nil && ref.Name == name && pod.DeletionTimestamp == nil {
			errs = append(errs, t.deletePod(ctx, pod, "virtual machine deleted"))
		}
	}
	return errors.Join(errs...)
}

// refuse counts bad input and logs it, rate-limited per cause and VM.
func (t *term) refuse(key, cause string, err error) {
	t.badInput.WithLabelValues(cause).Inc()
	if ok, suppressed := t.lim.Allow(cause + " " + key); ok {
		t.logger.Warn("virtual machine refused", "vm", key, "cause", cause, "suppressed", suppressed, "err", err)
	}
}
