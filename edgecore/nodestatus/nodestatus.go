// Package nodestatus reports the edge node to the cloud: it registers the
// Node (capacity, allocatable, nodeInfo, addresses, labels) at a start
// unless the cloud's copy of the Node already says all of it (held.go),
// renews the node's Lease as a heartbeat, and refreshes the Ready
// condition, which is True only when the container runtime answers that it
// can run pods. Host facts come from edgecore/hostinfo; the runtime is
// asked through the Runtime interface (CRI adapts a CRI client). It
// only publishes into the durable outbox, so reports made while offline
// wait there (newest per object) and reach the cloud on reconnect. A
// report that cannot be queued (the store is busy or the disk full) is
// logged, counted and made again at the next report; it never stops the
// reporter. It reports only the conditions the edge owns (Ready): the cloud
// merges them into the Node by type, so conditions others write there
// (CloudCore's TetherConnected, a node problem detector's) stay.
package nodestatus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"runtime"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/common/ratelog"
	"github.com/tetheredge/tether/edgecore/hostinfo"
	"github.com/tetheredge/tether/edgecore/store"
)

// KubeletVersion is the Node's nodeInfo.kubeletVersion. It is a valid
// semantic version, as components that compare kubelet versions require,
// and 0.0.0 so that nothing takes Tether for a kubelet of some Kubernetes
// release and assumes that release's kubelet features.
const KubeletVersion = "v0.0.0-tether"

// DefaultMaxPods is the pods capacity when Config.MaxPods is 0 (kubelet's
// default).
const DefaultMaxPods = 110

// DefaultStatusEvery is Config.StatusEvery's default (kubelet's
// nodeStatusReportFrequency).
const DefaultStatusEvery = 5 * time.Minute

// Publisher queues an upstream write (the syncer).
type Publisher interface {
	Publish(ctx context.Context, item store.OutboxItem) error
}

// Config configures a Reporter; zero values mean the defaults beside them.
type Config struct {
	// Node is this node's name. Required.
	Node string
	// Labels are added to the Node at registration.
	Labels map[string]string
	// LeaseDuration is the lease's duration; it is renewed every quarter
	// of it. Default 40s (as kubelet).
	LeaseDuration time.Duration
	// StatusEvery is how often the Node's status is published when
	// nothing changed. Default 5m, as kubelet's nodeStatusReportFrequency:
	// the Lease carries liveness. The runtime is asked at every lease
	// renewal too, and a change of the Ready condition is published then,
	// without waiting for StatusEvery.
	StatusEvery time.Duration
	// Held, when set, is where the reporter reads the node's own Node as
	// the cloud sent it (the edge store), so that it reports only what the
	// cloud does not hold yet: no registration at a start that changes
	// nothing, a status report when the cloud's Node stops saying what the
	// edge reports (held.go). Nil: the node registers at every start.
	Held Held
	// Runtime, when set, decides the Ready condition: Ready is True only
	// while it answers RuntimeReady (and NetworkReady, with
	// RequireNetwork), and its version is the Node's
	// containerRuntimeVersion. Each question has a deadline of
	// LeaseDuration/8. Nil: no runtime is configured; see RequireRuntime.
	Runtime Runtime
	// RequireRuntime, with Runtime nil, makes the Node NotReady (reason
	// ContainerRuntimeUnreachable): nothing can run there. False (the
	// default): a node without a runtime is Ready while EdgeCore runs, as
	// for a node that only syncs (the sync path's end-to-end tests). It has
	// no effect when Runtime is set.
	RequireRuntime bool
	// RequireNetwork makes Ready also require the runtime's NetworkReady:
	// set it when pods use CNI. Default false (host network only).
	RequireNetwork bool
	// HostRoot is the root below which host facts are read (/proc, /sys,
	// /etc). Default "/"; tests use a synthetic tree.
	HostRoot string
	// DataDir is a directory on the filesystem whose size is the
	// ephemeral-storage capacity (EdgeCore's data directory). Default
	// HostRoot.
	DataDir string
	// MemoryBytes overrides the memory capacity (default: MemTotal of
	// /proc/meminfo).
	MemoryBytes int64
	// MaxPods is the pods capacity. Default DefaultMaxPods.
	MaxPods int64
	// SystemReserved and KubeReserved are subtracted from capacity to give
	// allocatable, as kubelet's flags of those names; only cpu, memory and
	// ephemeral-storage. Default none.
	SystemReserved, KubeReserved corev1.ResourceList
	// ReservedCores are whole cores kept from pods and VMs: the resource
	// pool's reserved system and data-plane cores (edgecore/resources).
	// Allocatable cpu is capacity less them. System cores, when any,
	// supersede the cpu of SystemReserved and KubeReserved, as kubelet's
	// --reserved-cpus supersedes those flags' cpu; data-plane cores are
	// subtracted on top. Zero: none.
	ReservedCores ReservedCores
	// ExtendedResources are advertised with capacity and allocatable
	// alike, such as the pool's VF counts (sriov.edge.tether.dev/<pool>).
	// Names must be domain-qualified (contain a "/"). Nil: none.
	ExtendedResources map[corev1.ResourceName]int64
	// EvictionHard are the hard eviction thresholds subtracted from
	// allocatable, as kubelet's --eviction-hard: memory.available and
	// nodefs.available (ephemeral-storage), each a quantity or a
	// percentage of capacity. Nil: kubelet's defaults, memory.available
	// 100Mi and nodefs.available 10%; an empty map: none.
	EvictionHard map[string]string
	// Now defaults to time.Now.
	Now func() time.Time
	// Registerer, when set, gets the reporter's metrics.
	Registerer prometheus.Registerer
}

// Reporter publishes the node's registration, lease and status.
type Reporter struct {
	cfg         Config
	pub         Publisher
	logger      *slog.Logger
	lim         *ratelog.Limiter
	failures    *prometheus.CounterVec
	readyGauge  prometheus.Gauge
	facts       hostinfo.Facts
	capacity    corev1.ResourceList
	allocatable corev1.ResourceList

	mu      sync.Mutex
	ready   readiness // the Ready condition now
	since   time.Time // when ready.status last changed
	version string    // the runtime's last answered version
}

// New returns a reporter. A nil logger discards logs.
func New(cfg Config, pub Publisher, logger *slog.Logger) (*Reporter, error) {
	if cfg.Node == "" {
		return nil, errors.New("nodestatus config: Node is required")
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	if cfg.LeaseDuration <= 0 {
		cfg.LeaseDuration = 40 * time.Second
	}
	if cfg.StatusEvery <= 0 {
		cfg.StatusEvery = DefaultStatusEvery
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.HostRoot == "" {
		cfg.HostRoot = "/"
	}
	if cfg.DataDir == "" {
		cfg.DataDir = cfg.HostRoot
	}
	if cfg.MaxPods <= 0 {
		cfg.MaxPods = DefaultMaxPods
	}
	facts, err := hostinfo.Read(cfg.HostRoot)
	if cfg.MemoryBytes > 0 {
		facts.MemoryBytes = cfg.MemoryBytes
	}
	if err != nil && (facts.MemoryBytes == 0 || facts.KernelVersion == "") {
		return nil, fmt.Errorf("read host facts: %w", err)
	}
	if err != nil {
		logger.Warn("some host facts could not be read", "err", err)
	}
	storage, err := hostinfo.StorageBytes(cfg.DataDir)
	if err != nil {
		return nil, fmt.Errorf("read ephemeral storage: %w", err)
	}
	reserved, err := sumReserved(cfg.SystemReserved, cfg.KubeReserved)
	if err != nil {
		return nil, fmt.Errorf("nodestatus config: %w", err)
	}
	eviction, err := parseEviction(cfg.EvictionHard)
	if err != nil {
		return nil, fmt.Errorf("nodestatus config: %w", err)
	}
	if reserved, err = reserveCores(reserved, cfg.ReservedCores); err != nil {
		return nil, fmt.Errorf("nodestatus config: %w", err)
	}
	capacity := hostResources{facts: facts, storageBytes: storage, maxPods: cfg.MaxPods}.capacity()
	if err := addExtended(capacity, cfg.ExtendedResources); err != nil {
		return nil, fmt.Errorf("nodestatus config: %w", err)
	}
	failures := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "tether_edge_nodestatus_publish_failures_total",
		Help: "Node and lease reports that could not be queued in the outbox (made again at the next report), by report.",
	}, []string{"report"})
	readyGauge := prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "tether_edge_nodestatus_ready",
		Help: "1 while the Node's Ready condition is True (the runtime answers ready), else 0.",
	})
	if cfg.Registerer != nil {
		for _, c := range []prometheus.Collector{failures, readyGauge} {
			if err := cfg.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("register nodestatus metrics: %w", err)
			}
		}
	}
	r := &Reporter{
		cfg: cfg, pub: pub, logger: logger.With("component", "nodestatus"), lim: ratelog.New(0, nil), failures: failures,
		readyGauge: readyGauge, facts: facts, capacity: capacity, allocatable: allocatable(capacity, reserved, eviction),
		ready: ready(cfg.Runtime != nil, RuntimeState{}, errNotAsked, cfg.RequireRuntime, cfg.RequireNetwork), since: cfg.Now(),
	}
	r.setGauge(r.ready)
	return r, nil
}

func (r *Reporter) setGauge(rd readiness) {
	if rd.status == corev1.ConditionTrue {
		r.readyGauge.Set(1)
	} else {
		r.readyGauge.Set(0)
	}
}

// probe asks the runtime (when one is configured) and updates the Ready
// condition; it returns whether the condition's status or reason changed
// (only a status change moves its lastTransitionTime).
func (r *Reporter) probe(ctx context.Context) bool {
	var st RuntimeState
	var err error
	if r.cfg.Runtime != nil {
		pctx, cancel := context.WithTimeout(ctx, r.cfg.LeaseDuration/8)
		st, err = r.cfg.Runtime.RuntimeStatus(pctx)
		cancel()
		if ctx.Err() != nil {
			return false // stopping: the answer says nothing of the runtime
		}
	}
	now := ready(r.cfg.Runtime != nil, st, err, r.cfg.RequireRuntime, r.cfg.RequireNetwork)
	r.mu.Lock()
	defer r.mu.Unlock()
	if err == nil && st.Version != "" {
		r.version = st.Version
	}
	if now.status != r.ready.status {
		r.since = r.cfg.Now()
	}
	changed := now.status != r.ready.status || now.reason != r.ready.reason
	if changed {
		r.logger.Info("node readiness changed", "ready", now.status, "reason", now.reason, "message", now.message)
	}
	r.ready = now
	r.setGauge(now)
	return changed
}

// Run registers the node (unless the cloud's Node says it all already:
// see held.go), then renews its lease every quarter of LeaseDuration and
// reports its status every StatusEvery, at once when the Ready condition
// changes, and when the cloud's Node stops saying what the edge reports,
// until ctx ends. A report that fails is made again at the next report (a
// registration that failed: at every lease renewal until it succeeds); Run
// returns only when ctx ends, with nil.
func (r *Reporter) Run(ctx context.Context) error {
	every := r.cfg.LeaseDuration / 4
	lease := time.NewTicker(every)
	defer lease.Stop()
	heldChanged := make(chan struct{}, 1)
	if r.cfg.Held != nil {
		key := r.nodeKey()
		cancel := r.cfg.Held.Subscribe(func(keys []objsync.Key) {
			if slices.Contains(keys, key) {
				select {
				case heldChanged <- struct{}{}:
				default:
				}
			}
		})
		defer cancel()
	}
	// A status report for a held Node that differs is made at most once
	// per lease interval after any Node report (time.Now: the interval is
	// real time whatever clock dates the reports), so that the Node in
	// flight is not reported again while the old one is still held (the
	// Node the cloud had before the registration arrives after it); one
	// held back waits for the next renewal.
	var nextFix time.Time
	fixPending := false
	r.probe(ctx)
	registered, published, firstStatus := r.start(ctx)
	if published {
		nextFix = time.Now().Add(every)
	}
	status := time.NewTimer(firstStatus)
	defer status.Stop()
	reportStatus := func() {
		if r.report(ctx, "status", r.publishNode(ctx, message.OpStatus)) {
			status.Reset(r.cfg.StatusEvery)
			nextFix = time.Now().Add(every)
		}
	}
	fix := func() {
		if !registered {
			return // the registration carries the status
		}
		if held := r.held(ctx); held != nil && sameStatus(held, r.Node()) {
			fixPending = false
			return
		}
		if time.Now().Before(nextFix) {
			fixPending = true
			return
		}
		fixPending = false
		reportStatus()
	}
	r.report(ctx, "lease", r.publishLease(ctx))
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-lease.C:
			r.report(ctx, "lease", r.publishLease(ctx))
			changed := r.probe(ctx)
			switch {
			case !registered:
				registered = r.report(ctx, "node", r.publishNode(ctx, message.OpUpsert))
				if registered {
					nextFix = time.Now().Add(every)
				}
			case changed:
				reportStatus()
			case fixPending:
				fix()
			}
		case <-status.C:
			status.Reset(r.cfg.StatusEvery)
			r.probe(ctx)
			if registered {
				reportStatus()
			}
		case <-heldChanged:
			fix()
		}
	}
}

// start makes the reports due at start: the registration, unless the held
// Node has the labels and the status the edge would register, and a status
// report if the held heartbeat is older than StatusEvery. It returns
// whether the node counts as registered, whether a Node report was queued,
// and when the first status report is due.
func (r *Reporter) start(ctx context.Context) (registered, published bool, firstStatus time.Duration) {
	held := r.held(ctx)
	r.adoptTransition(held)
	want := r.Node()
	if held == nil || !hasLabels(held, want) || !sameStatus(held, want) {
		ok := r.report(ctx, "node", r.publishNode(ctx, message.OpUpsert))
		return ok, ok, r.cfg.StatusEvery
	}
	age := r.cfg.Now().Sub(heartbeat(held))
	if age < 0 || age >= r.cfg.StatusEvery {
		// Stale (or dated in the future: the clock stepped back): report.
		if r.report(ctx, "status", r.publishNode(ctx, message.OpStatus)) {
			return true, true, r.cfg.StatusEvery
		}
		return true, false, r.cfg.LeaseDuration / 4 // queued at the next renewal
	}
	r.logger.Debug("node registration skipped: the cloud holds it", "heartbeat_age", age)
	return true, false, r.cfg.StatusEvery - age
}

// report counts and logs (rate-limited) a failed report; it returns
// whether the report was queued.
func (r *Reporter) report(ctx context.Context, what string, err error) bool {
	if err == nil {
		return true
	}
	if ctx.Err() != nil {
		return false // stopping: not a failure
	}
	r.failures.WithLabelValues(what).Inc()
	if ok, suppressed := r.lim.Allow(what); ok {
		r.logger.Warn("node report not queued; retrying at the next report", "report", what, "err", err, "suppressed", suppressed)
	}
	return false
}

// Node returns the Node object this reporter registers, with the Ready
// condition of the runtime's last answer (before Run has asked: NotReady
// when a Runtime is configured).
func (r *Reporter) Node() *corev1.Node {
	r.mu.Lock()
	rd, since, version := r.ready, metav1.NewTime(r.since), r.version
	r.mu.Unlock()
	now := metav1.NewTime(r.cfg.Now())
	f := r.facts
	n := &corev1.Node{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Node"},
		ObjectMeta: metav1.ObjectMeta{Name: r.cfg.Node, Labels: map[string]string{"kubernetes.io/hostname": r.cfg.Node, "kubernetes.io/os": runtime.GOOS, "kubernetes.io/arch": runtime.GOARCH}},
		Status: corev1.NodeStatus{
			Capacity:    r.capacity.DeepCopy(),
			Allocatable: r.allocatable.DeepCopy(),
			Addresses:   addresses(r.cfg.Node),
			Conditions: []corev1.NodeCondition{{
				Type: corev1.NodeReady, Status: rd.status, Reason: rd.reason,
				Message: rd.message, LastHeartbeatTime: now, LastTransitionTime: since,
			}},
			NodeInfo: corev1.NodeSystemInfo{
				MachineID: f.MachineID, SystemUUID: f.SystemUUID, BootID: f.BootID,
				KernelVersion: f.KernelVersion, OSImage: f.OSImage, ContainerRuntimeVersion: version,
				KubeletVersion: KubeletVersion, OperatingSystem: runtime.GOOS, Architecture: runtime.GOARCH,
			},
		},
	}
	for k, v := range r.cfg.Labels {
		n.Labels[k] = v
	}
	return n
}

func (r *Reporter) publishNode(ctx context.Context, op message.Op) error {
	data, err := json.Marshal(r.Node())
	if err != nil {
		return fmt.Errorf("encode node: %w", err)
	}
	return r.pub.Publish(ctx, store.OutboxItem{Op: op, Resource: message.Resource{Version: "v1", Kind: "Node", Name: r.cfg.Node}, Data: data})
}

func (r *Reporter) publishLease(ctx context.Context) error {
	now := metav1.NewMicroTime(r.cfg.Now())
	secs := int32(r.cfg.LeaseDuration / time.Second)
	holder := r.cfg.Node
	// The spec only: the cloud names the Lease after the session's node
	// and writes nothing but its spec (cloudcore/upstream), so apiVersion,
	// kind and metadata would be about 100 bytes of every renewal for
	// nothing. It still decodes as a Lease.
	data, err := json.Marshal(struct {
		Spec coordinationv1.LeaseSpec `json:"spec"`
	}{coordinationv1.LeaseSpec{HolderIdentity: &holder, LeaseDurationSeconds: &secs, RenewTime: &now}})
	if err != nil {
		return fmt.Errorf("encode lease: %w", err)
	}
	return r.pub.Publish(ctx, store.OutboxItem{
		Op:       message.OpUpsert,
		Resource: message.Resource{Group: "coordination.k8s.io", Version: "v1", Kind: "Lease", Namespace: "kube-node-lease", Name: r.cfg.Node},
		Data:     data,
	})
}

func addresses(host string) []corev1.NodeAddress {
	out := []corev1.NodeAddress{{Type: corev1.NodeHostName, Address: host}}
	ifaces, err := net.InterfaceAddrs()
	if err != nil {
		return out
	}
	for _, a := range ifaces {
		if ipn, ok := a.(*net.IPNet); ok && !ipn.IP.IsLoopback() && ipn.IP.To4() != nil {
			out = append(out, corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: ipn.IP.String()})
		}
	}
	return out
}
