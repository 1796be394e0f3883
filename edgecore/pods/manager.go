// Package pods is EdgeCore's pod manager: the part of a kubelet an edge node
// needs. It reconciles the pods bound to this node, as the SQLite store holds
// them, against what the container runtime runs, and reports each pod's
// status upstream through the outbox.
//
// It is level-triggered. Store changes, runtime events and a slow relist only
// enqueue pod keys ("namespace/name"); a worker reads the desired pod from
// the store and the actual sandboxes and containers from the runtime (found
// by the kubelet's labels, so containers that already run are adopted, also
// across an EdgeCore restart), acts, and computes the status. Failures retry
// through one rate-limited workqueue with exponential back-off.
//
// It talks to the runtime only through the CRI interfaces of
// k8s.io/cri-api/pkg/apis, so it works the same against EdgeCore's CRI shim
// or containerd itself. It must not read from the cloud, import a runtime
// backend or write the store other than through the Publisher; the one
// exception is the pods' service-account tokens, asked of the cloud
// through a TokenRequester and kept through a TokenStore (tokens.go).
package pods

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/util/workqueue"
	cri "k8s.io/cri-api/pkg/apis"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	"k8s.io/utils/clock"

	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/common/ratelog"
	"github.com/tetheredge/tether/edgecore/store"
)

// Store is what the manager reads from EdgeCore's store: the desired pods
// and the ConfigMaps and Secrets their env refers to. *store.Store
// implements it.
type Store interface {
	Get(ctx context.Context, key objsync.Key) (store.Object, bool, error)
	List(ctx context.Context, kind, namespace string) ([]store.Object, error)
}

// Publisher queues an upstream write (the syncer's Publish).
type Publisher interface {
	Publish(ctx context.Context, item store.OutboxItem) error
}

// ContainerEvent says that something happened to a container (it started,
// exited or was OOM-killed); the manager re-examines its pod.
type ContainerEvent struct {
	ContainerID string
}

// EventSource is an optional source of container events, such as the CRI
// shim's containerd events. Without one, exits are found by the relist.
// An exit must come once the runtime's ContainerStatus shows it: the
// manager syncs the pod once per event and does not look again.
type EventSource interface {
	Events() <-chan ContainerEvent
}

// Config configures the manager. Zero values mean the defaults beside each
// field.
type Config struct {
	// Node is this node's name, for the spec.nodeName fieldRef. Required.
	Node string
	// HostIPs are the node's addresses, reported as status.hostIP(s) and,
	// for host-network pods, as the pod IPs. Default none.
	HostIPs []string
	// LogDir holds the pods' container logs, one directory per pod. Default
	// /var/log/pods.
	LogDir string
	// RootDir holds the pods' volumes, one directory per pod UID. Default
	// /var/lib/tether/pods.
	RootDir string
	// RelistPeriod is how often every pod is re-examined, the safety net
	// for missed events. Default 10s.
	RelistPeriod time.Duration
	// BackoffBase is the first restart delay of a crashing container; it
	// doubles up to BackoffMax. Defaults 10s and 5m, as kubelet's.
	BackoffBase, BackoffMax time.Duration
	// BackoffReset: a container that ran this long restarts after
	// BackoffBase again. Default 10m.
	BackoffReset time.Duration
	// RetryBase and RetryMax bound the back-off of a pod whose sync failed
	// (the workqueue's one retry policy). Defaults 500ms and 5m.
	RetryBase, RetryMax time.Duration
	// ProbeTick is how often due probes are looked for. Default 250ms
	// (probe periods are whole seconds).
	ProbeTick time.Duration
	// Allocatable is what the node offers pods (the Node's
	// status.allocatable): a pod whose requests do not fit beside those of
	// the admitted pods is not started and gets a Failed status with
	// reason OutOfcpu, OutOfmemory, OutOfpods, OutOfhugepages-2Mi, ...
	// (see admit.go). A resource it does not name is not checked, except
	// hugepages. Default nil: every pod is admitted.
	Allocatable corev1.ResourceList
	// StaticCPUs, when set, is kubelet's CPU manager "static" policy on
	// this pool (the node's resource pool, shared with VMs): app
	// containers of Guaranteed pods with whole cores get cores of their
	// own, every other container the shared set (see cpus.go). Nil: the
	// "none" policy, every container on every CPU.
	StaticCPUs CPUPool
	// RuntimeHandlers maps a pod's runtimeClassName to the CRI runtime
	// handler its sandbox runs with. Default {"tether-vm": "tether-vm"}. A
	// pod without a runtimeClassName uses the runtime's default handler
	// (""); one whose runtimeClassName is not here does not start: its
	// containers wait with reason RuntimeClassNotFound.
	RuntimeHandlers map[string]string
	// VMHandler is the handler of virtual machines: its pods' container
	// statuses are read verbose and get the VM conditions (vm.go). Default
	// "tether-vm".
	VMHandler string
	// Workers is the number of pods synced at once. Default 4.
	Workers int
	// Clock defaults to the real clock.
	Clock clock.WithTicker
	// Events is an optional source of container events. It must deliver
	// an exit only once ContainerStatus shows it, as the containerd
	// backend does.
	Events EventSource
	// Tokens asks the cloud for the service-account tokens of
	// serviceAccountToken projections (tokens.go), and TokenStore keeps
	// them for restarts while offline; TokenStore is required with
	// Tokens. Nil: a pod with such a projection waits (reason
	// TokenUnavailable).
	Tokens     TokenRequester
	TokenStore TokenStore
	// TokenClock decides when tokens expire and are refreshed. Default
	// Clock.
	TokenClock clock.PassiveClock
	// Registerer, when set, gets the manager's metrics.
	Registerer prometheus.Registerer
}

func (c Config) withDefaults() Config {
	if c.LogDir == "" {
		c.LogDir = "/var/log/pods"
	}
	if c.RootDir == "" {
		c.RootDir = "/var/lib/tether/pods"
	}
	if c.RelistPeriod <= 0 {
		c.RelistPeriod = 10 * time.Second
	}
	if c.BackoffBase <= 0 {
		c.BackoffBase = 10 * time.Second
	}
	if c.BackoffMax <= 0 {
		c.BackoffMax = 5 * time.Minute
	}
	if c.BackoffMax < c.BackoffBase {
		c.BackoffMax = c.BackoffBase
	}
	if c.BackoffReset <= 0 {
		c.BackoffReset = 10 * time.Minute
	}
	if c.RetryBase <= 0 {
		c.RetryBase = 500 * time.Millisecond
	}
	if c.RetryMax <= 0 {
		c.RetryMax = 5 * time.Minute
	}
	if c.ProbeTick <= 0 {
		c.ProbeTick = 250 * time.Millisecond
	}
	if c.Workers <= 0 {
		c.Workers = 4
	}
	if c.RuntimeHandlers == nil {
		c.RuntimeHandlers = map[string]string{DefaultVMHandler: DefaultVMHandler}
	}
	c.RuntimeHandlers = maps(c.RuntimeHandlers)
	if c.VMHandler == "" {
		c.VMHandler = DefaultVMHandler
	}
	if c.Clock == nil {
		c.Clock = clock.RealClock{}
	}
	if c.TokenClock == nil {
		c.TokenClock = c.Clock
	}
	c.HostIPs = append([]string(nil), c.HostIPs...)
	if c.Allocatable != nil {
		c.Allocatable = c.Allocatable.DeepCopy()
	}
	return c
}

// Manager runs the pods of the store. Make one with New; Run runs it.
type Manager struct {
	cfg     Config
	st      Store
	rt      cri.RuntimeService
	img     cri.ImageManagerService
	pub     Publisher
	logger  *slog.Logger
	lim     *ratelog.Limiter
	queue   workqueue.TypedRateLimitingInterface[string]
	backoff backoff
	metrics metrics
	prober  prober
	// httpProbe runs httpGet probes: no keep-alive, no certificate check
	// (as kubelet's), no redirects followed beyond the client's default.
	httpProbe *http.Client

	// runtimeName prefixes container IDs in statuses ("containerd://").
	runtimeName string

	mu sync.Mutex
	// published is the status last published, per pod key.
	published map[string]published
	// deleted holds the UIDs whose deletion was published.
	deleted map[string]bool
	// admission holds the admission decisions.
	admission admission
	// refs are the ConfigMaps and Secrets each pod uses.
	refs objectRefs
	// tokens are the pods' service-account tokens; nil without
	// Config.Tokens.
	tokens *tokens
}

type metrics struct {
	syncs      *prometheus.CounterVec
	badObjects prometheus.Counter
}

// New returns a manager. A nil logger discards logs.
func New(cfg Config, st Store, rt cri.RuntimeService, img cri.ImageManagerService, pub Publisher, logger *slog.Logger) (*Manager, error) {
	switch {
	case cfg.Node == "":
		return nil, errors.New("pods: a node name is required")
	case st == nil || rt == nil || img == nil || pub == nil:
		return nil, errors.New("pods: store, runtime, image service and publisher are required")
	case cfg.Tokens != nil && cfg.TokenStore == nil:
		return nil, errors.New("pods: a token store is required with a token requester")
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	cfg = cfg.withDefaults()
	m := metrics{
		syncs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "tether", Subsystem: "pods", Name: "syncs_total",
			Help: "Pod syncs by result (ok, error).",
		}, []string{"result"}),
		badObjects: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "tether", Subsystem: "pods", Name: "bad_objects_total",
			Help: "Stored pods, ConfigMaps or Secrets that could not be decoded or used.",
		}),
	}
	mgr := &Manager{
		cfg: cfg, st: st, rt: rt, img: img, pub: pub,
		logger:  logger.With("component", "pods"),
		lim:     ratelog.New(0, nil),
		backoff: backoff{base: cfg.BackoffBase, max: cfg.BackoffMax, reset: cfg.BackoffReset},
		metrics: m,
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedItemExponentialFailureRateLimiter[string](cfg.RetryBase, cfg.RetryMax),
			workqueue.TypedRateLimitingQueueConfig[string]{Clock: cfg.Clock}),
		prober: prober{entries: make(map[string]*probeEntry)},
		httpProbe: &http.Client{Transport: &http.Transport{
			DisableKeepAlives: true,
			TLSClientConfig:   &tls.Config{InsecureSkipVerify: true}, //nolint:gosec // kubelet does not verify probe targets either
		}},
		published: make(map[string]published),
		deleted:   make(map[string]bool),
		admission: newAdmission(),
	}
	collectors := []prometheus.Collector{m.syncs, m.badObjects, newPhaseCollector(mgr)}
	if cfg.Tokens != nil {
		mgr.tokens = newTokens(cfg.Tokens, cfg.TokenStore, cfg.TokenClock, mgr.logger, mgr.lim)
		collectors = append(collectors, mgr.tokens.result)
	}
	if cfg.Registerer != nil {
		for _, c := range collectors {
			if err := cfg.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("register pod manager metrics: %w", err)
			}
		}
	}
	return mgr, nil
}

// OnStoreChange enqueues the pods among keys, and the pods that use the
// ConfigMaps and Secrets among them. Give it to store.Subscribe; it never
// blocks.
func (m *Manager) OnStoreChange(keys []objsync.Key) {
	for _, k := range keys {
		if k.Group != "" {
			continue
		}
		switch k.Kind {
		case "Pod":
			m.Enqueue(k.Namespace + "/" + k.Name)
		case "ConfigMap", "Secret":
			for _, p := range m.refs.pods(k.Kind, k.Namespace, k.Name) {
				m.Enqueue(p)
			}
		}
	}
}

// Enqueue asks for the pod "namespace/name" to be synced. It never blocks.
func (m *Manager) Enqueue(podKey string) { m.queue.Add(podKey) }

// Run syncs pods until ctx ends. It can run once.
func (m *Manager) Run(ctx context.Context) error {
	defer m.queue.ShutDown()
	v, err := m.rt.Version(ctx, "v1")
	if err != nil {
		return fmt.Errorf("query runtime version: %w", err)
	}
	m.runtimeName = v.GetRuntimeName()
	m.logger.Info("pod manager started", "runtime", v.GetRuntimeName(), "runtime_version", v.GetRuntimeVersion())
	if err := m.adoptAdmitted(ctx); err != nil {
		return err
	}

	g, ctx := errgroup.WithContext(ctx)
	for range m.cfg.Workers {
		g.Go(func() error {
			for m.processNext(ctx) {
			}
			return nil
		})
	}
	resync := make(chan struct{}, 1) // the static CPU policy's safety net
	if m.cfg.StaticCPUs != nil {
		g.Go(func() error { return m.cpuLoop(ctx, resync) })
	}
	g.Go(func() error {
		// The first relist adopts what already runs and starts what is
		// missing.
		t := m.cfg.Clock.NewTicker(m.cfg.RelistPeriod)
		defer t.Stop()
		for {
			m.relist(ctx)
			select {
			case resync <- struct{}{}:
			default:
			}
			select {
			case <-ctx.Done():
				return nil
			case <-t.C():
			}
		}
	})
	g.Go(func() error { return m.probeLoop(ctx, g.Go) })
	if m.cfg.Events != nil {
		g.Go(func() error { return m.watchEvents(ctx) })
	}
	g.Go(func() error {
		<-ctx.Done()
		m.queue.ShutDown()
		return nil
	})
	err = g.Wait()
	if err == nil && ctx.Err() != nil {
		return nil
	}
	return err
}

func (m *Manager) processNext(ctx context.Context) bool {
	key, quit := m.queue.Get()
	if quit {
		return false
	}
	defer m.queue.Done(key)
	after, err := m.sync(ctx, key)
	switch {
	case err != nil && ctx.Err() != nil:
		// Shutting down: the next run relists.
	case err != nil:
		m.metrics.syncs.WithLabelValues("error").Inc()
		if ok, suppressed := m.lim.Allow("sync " + key); ok {
			m.logger.Warn("pod sync failed", "pod", key, "error", err, "suppressed", suppressed)
		}
		m.queue.AddRateLimited(key)
	default:
		m.metrics.syncs.WithLabelValues("ok").Inc()
		m.queue.Forget(key)
		if after > 0 {
			m.queue.AddAfter(key, after)
		}
	}
	return true
}

// relist enqueues every stored pod and every pod the runtime runs, and
// removes the stored tokens of pods the store no longer holds.
func (m *Manager) relist(ctx context.Context) {
	objs, err := m.st.List(ctx, "Pod", "")
	if err != nil && ctx.Err() == nil {
		m.logger.Warn("list stored pods failed", "error", err)
	}
	uids := make(map[string]bool, len(objs))
	for _, o := range objs {
		if o.Resource.Group == "" {
			m.Enqueue(o.Resource.Namespace + "/" + o.Resource.Name)
			uids[o.Resource.UID] = true
		}
	}
	if err == nil {
		if err := m.tokens.prune(ctx, uids); err != nil && ctx.Err() == nil {
			m.logger.Warn("remove tokens of deleted pods failed", "error", err)
		}
	}
	sbs, err := m.rt.ListPodSandbox(ctx, nil)
	if err != nil && ctx.Err() == nil {
		m.logger.Warn("list sandboxes failed", "error", err)
	}
	for _, sb := range sbs {
		if key, ok := podKeyOf(sb.GetLabels()); ok {
			m.Enqueue(key)
		}
	}
}

// watchEvents enqueues the pod of each container event. The source must
// deliver an exit only once the runtime's ContainerStatus shows it (the
// containerd backend waits for its CRI plugin to record the exit), so the
// one sync an event triggers sees the exit; an exit the backend could not
// confirm in time is left to the relist.
func (m *Manager) watchEvents(ctx context.Context) error {
	ch := m.cfg.Events.Events()
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-ch:
			if !ok {
				return nil
			}
			cs, err := m.rt.ListContainers(ctx, &runtimeapi.ContainerFilter{Id: ev.ContainerID})
			if err != nil {
				continue // the relist catches it
			}
			for _, c := range cs {
				if key, ok := podKeyOf(c.GetLabels()); ok {
					m.Enqueue(key)
				}
			}
		}
	}
}

// podKeyOf returns "namespace/name" from kubelet labels.
func podKeyOf(labels map[string]string) (string, bool) {
	ns, name := labels[labelPodNamespace], labels[labelPodName]
	if ns == "" || name == "" || labels[labelPodUID] == "" {
		return "", false
	}
	return ns + "/" + name, true
}

func splitKey(key string) (namespace, name string) {
	namespace, name, _ = strings.Cut(key, "/")
	return namespace, name
}
