package resources

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/utils/cpuset"

	"github.com/tetheredge/tether/common/ratelog"
	"github.com/tetheredge/tether/edgecore/store"
)

// How a grant sits in the store's allocation table, all rows of one owner
// claimed in one transaction:
//
//	kind "cpu", item "N"                 a dedicated core (exclusive)
//	kind "hugepages-2Mi", item owner     hugepage bytes (counted, limit nr_hugepages × size)
//	kind "vf", item PCI address          a VF (exclusive), detail {"pool","previousDriver"}
//	kind "grant", item owner             the request and the grant, JSON, for Lookup
//
// The exclusive rows make a core or a VF impossible to grant twice, also
// across two Pools on one store; the counted row keeps hugepages within
// the kernel's pages. The shared set is computed, never stored: the node's
// CPUs less both reserved sets less every "cpu" row.
const (
	kindCPU   = "cpu"
	kindVF    = "vf"
	kindGrant = "grant"
)

// ErrInvalid is wrapped by the error of a request the pool refuses as
// malformed (no owner, a negative count, an unknown pool or page size).
var ErrInvalid = errors.New("resources: invalid request")

// ErrUnavailable is wrapped when the node is not set up for what a
// request asks (no hugetlbfs mount of its page size).
var ErrUnavailable = errors.New("resources: not set up on this node")

// claimAttempts bounds the retries of a claim that lost a race for an
// item to another Pool on the same store.
const claimAttempts = 4

// Pool grants cores, hugepages and VFs to sandboxes. It is safe for
// concurrent use: Allocate and Release of one Pool are serialised, and
// the store's uniqueness of (kind, item) keeps two Pools on one store from
// granting one item twice.
type Pool struct {
	s        settings
	sys      sysfs
	allocs   store.Allocations
	logger   *slog.Logger
	lim      *ratelog.Limiter
	requests *prometheus.CounterVec
	swept    prometheus.Counter

	mu sync.Mutex

	subMu  sync.Mutex
	subs   map[int]func(shared []int)
	nextID int
}

// New validates cfg and returns a pool that records its grants in allocs.
// A nil logger discards logs.
func New(cfg Config, allocs store.Allocations, logger *slog.Logger) (*Pool, error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	s, err := validate(cfg)
	if err != nil {
		return nil, err
	}
	requests := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "tether_edge_resources_requests_total",
		Help: "Allocate calls of the resource pool by result: granted, insufficient, invalid (refused request), failed (store or sysfs error); and release_failed, Release calls that could not restore a VF.",
	}, []string{"result"})
	swept := prometheus.NewCounter(prometheus.CounterOpts{
		Name: "tether_edge_resources_swept_total",
		Help: "Grants released by Sweep because their owner (a VM record, a pod) was gone.",
	})
	if cfg.Registerer != nil {
		for _, c := range []prometheus.Collector{requests, swept} {
			if err := cfg.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("register resources metrics: %w", err)
			}
		}
	}
	logger = logger.With("component", "resources")
	for _, dir := range s.notHugetlbfs {
		logger.Warn("hugepage mount is not a hugetlbfs; guest memory there is not hugepages", "dir", dir)
	}
	return &Pool{
		s: s, sys: sysfs(s.sysfs), allocs: allocs, logger: logger,
		lim: ratelog.New(0, nil), requests: requests, swept: swept,
	}, nil
}

// record is the "grant" row's detail.
type record struct {
	Request Request `json:"request"`
	Grant   Grant   `json:"grant"`
}

// vfDetail is a "vf" row's detail.
type vfDetail struct {
	Pool           string `json:"pool"`
	PreviousDriver string `json:"previousDriver"`
}

// Allocate grants req all or nothing. A request the pool cannot meet
// returns an error wrapping *InsufficientError and leaves nothing claimed
// and nothing bound. An owner that already holds a grant for the same
// request gets that grant again (its VFs bound again if a crash came
// between claim and bind); for another request, an error.
func (p *Pool) Allocate(ctx context.Context, req Request) (Grant, error) {
	g, err := p.allocate(ctx, req)
	result := "granted"
	switch {
	case err == nil:
	case errors.Is(err, ErrInsufficient):
		result = "insufficient"
	case errors.Is(err, ErrInvalid), errors.Is(err, ErrUnavailable):
		result = "invalid"
	default:
		result = "failed"
	}
	p.requests.WithLabelValues(result).Inc()
	if err != nil {
		if ok, suppressed := p.lim.Allow(result); ok {
			p.logger.Warn("resource request refused", "owner", req.Owner, "result", result, "err", err, "suppressed", suppressed)
		}
		return Grant{}, err
	}
	if len(g.CPUs) > 0 {
		p.notify(ctx)
	}
	return g, nil
}

// Subscribe calls f with the shared set after each Allocate or Release
// that changed the dedicated cores: whoever pins threads or containers
// to the shared set (a VM's emulator threads, the containers of pods
// without exclusive cores) moves them off cores just dedicated, and onto
// cores just freed. f runs on the goroutine of that Allocate or Release,
// after the pool's lock is released; it must not block. cancel stops the
// calls.
func (p *Pool) Subscribe(f func(shared []int)) (cancel func()) {
	p.subMu.Lock()
	defer p.subMu.Unlock()
	if p.subs == nil {
		p.subs = map[int]func([]int){}
	}
	id := p.nextID
	p.nextID++
	p.subs[id] = f
	return func() {
		p.subMu.Lock()
		defer p.subMu.Unlock()
		delete(p.subs, id)
	}
}

func (p *Pool) notify(ctx context.Context) {
	p.subMu.Lock()
	subs := slices.Collect(maps.Values(p.subs))
	p.subMu.Unlock()
	if len(subs) == 0 {
		return
	}
	shared, err := p.SharedCPUs(ctx)
	if err != nil {
		if ok, suppressed := p.lim.Allow("shared"); ok {
			p.logger.Warn("shared cpus not read; subscribers not told", "err", err, "suppressed", suppressed)
		}
		return
	}
	for _, f := range subs {
		f(shared)
	}
}

func (p *Pool) allocate(ctx context.Context, req Request) (Grant, error) {
	if err := p.check(req); err != nil {
		return Grant{}, fmt.Errorf("allocate for %q: %w", req.Owner, err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	rec, ok, err := p.lookup(ctx, req.Owner)
	if err != nil {
		return Grant{}, err
	}
	if ok {
		if !sameRequest(rec.Request, req) {
			return Grant{}, fmt.Errorf("allocate for %q: %w: it holds a grant for another request; release it first", req.Owner, ErrInvalid)
		}
		if err := p.bind(rec.Grant.VFs); err != nil {
			return Grant{}, fmt.Errorf("allocate for %q: %w", req.Owner, err)
		}
		return rec.Grant, nil
	}
	for attempt := 1; ; attempt++ {
		g, rows, limits, err := p.plan(ctx, req)
		if err != nil {
			return Grant{}, fmt.Errorf("allocate for %q: %w", req.Owner, err)
		}
		err = p.allocs.Claim(ctx, req.Owner, rows, limits)
		if errors.Is(err, store.ErrTaken) && attempt < claimAttempts {
			continue // another Pool took an item between plan and claim: plan again
		}
		if errors.Is(err, store.ErrInsufficient) {
			// Another Pool's claim used the pages since the plan.
			err = p.hugepagesShort(ctx, req)
		}
		if err != nil {
			return Grant{}, fmt.Errorf("allocate for %q: %w", req.Owner, err)
		}
		if err := p.bind(g.VFs); err != nil {
			rerr := p.allocs.ReleaseKinds(ctx, req.Owner, ownKinds(rows)...)
			return Grant{}, errors.Join(fmt.Errorf("allocate for %q: %w", req.Owner, err), rerr)
		}
		p.logger.Info("resources granted", "owner", req.Owner, "cpus", cpuset.New(g.CPUs...).String(),
			"hugepage_dir", g.HugepageDir, "hugepage_bytes", req.HugepageBytes, "vfs", len(g.VFs))
		return g, nil
	}
}

// check refuses a malformed request.
func (p *Pool) check(req Request) error {
	switch {
	case req.Owner == "":
		return fmt.Errorf("%w: no owner", ErrInvalid)
	case len(req.Owner) > store.MaxAllocationField:
		return fmt.Errorf("%w: owner is %d bytes, limit %d", ErrInvalid, len(req.Owner), store.MaxAllocationField)
	case req.DedicatedCPUs < 0:
		return fmt.Errorf("%w: %d dedicated cpus", ErrInvalid, req.DedicatedCPUs)
	case req.HugepageBytes < 0:
		return fmt.Errorf("%w: %d hugepage bytes", ErrInvalid, req.HugepageBytes)
	case req.HugepageSize < 0, req.HugepageSize == 0 && req.HugepageBytes > 0:
		return fmt.Errorf("%w: %d hugepage bytes of page size %d", ErrInvalid, req.HugepageBytes, req.HugepageSize)
	case req.HugepageSize > 0 && req.HugepageBytes%req.HugepageSize != 0:
		return fmt.Errorf("%w: %d hugepage bytes are not a whole number of %s pages", ErrInvalid, req.HugepageBytes, sizeName(req.HugepageSize))
	}
	for name, n := range req.VFs {
		if _, ok := p.s.pools[name]; !ok {
			return fmt.Errorf("%w: no VF pool %q on this node (pools: %s)", ErrInvalid, name, strings.Join(p.s.poolNames, ", "))
		}
		if n < 0 {
			return fmt.Errorf("%w: %d VFs of pool %s", ErrInvalid, n, name)
		}
	}
	return nil
}

// plan picks what req gets from what the store says is free, and the rows
// that claim it.
func (p *Pool) plan(ctx context.Context, req Request) (Grant, []store.Allocation, map[string]int64, error) {
	g := Grant{Owner: req.Owner}
	var rows []store.Allocation
	limits := map[string]int64{}

	held, err := p.heldCPUs(ctx)
	if err != nil {
		return g, nil, nil, err
	}
	free := p.s.allocatable.Difference(held)
	if free.Size() < req.DedicatedCPUs {
		return g, nil, nil, &InsufficientError{Resource: "cpu", Requested: int64(req.DedicatedCPUs), Free: int64(free.Size())}
	}
	g.CPUs = free.List()[:req.DedicatedCPUs]
	for _, c := range g.CPUs {
		rows = append(rows, store.Allocation{Kind: kindCPU, Item: strconv.Itoa(c)})
	}
	g.SharedCPUs = free.Difference(cpuset.New(g.CPUs...)).List()

	if req.HugepageBytes > 0 {
		dir, ok := p.s.mounts[req.HugepageSize]
		if !ok {
			return g, nil, nil, fmt.Errorf("%w: no hugetlbfs mount of page size %s (mount one, or set HugepageMounts)", ErrUnavailable, sizeName(req.HugepageSize))
		}
		kind := HugepageResource(req.HugepageSize)
		limit, used, err := p.hugepageUse(ctx, req.HugepageSize)
		if err != nil {
			return g, nil, nil, err
		}
		if used+req.HugepageBytes > limit {
			return g, nil, nil, &InsufficientError{Resource: kind, Requested: req.HugepageBytes, Free: max(limit-used, 0)}
		}
		g.HugepageDir = dir
		limits[kind] = limit
		rows = append(rows, store.Allocation{Kind: kind, Item: req.Owner, Amount: req.HugepageBytes})
	}

	heldVFs, err := p.heldVFs(ctx)
	if err != nil {
		return g, nil, nil, err
	}
	for _, name := range slices.Sorted(maps.Keys(req.VFs)) {
		n := req.VFs[name]
		if n == 0 {
			continue
		}
		vfs, err := p.freeVFs(name, heldVFs)
		if err != nil {
			return g, nil, nil, err
		}
		if len(vfs) < n {
			return g, nil, nil, &InsufficientError{Resource: ResourcePrefixVF + name, Requested: int64(n), Free: int64(len(vfs))}
		}
		for _, vf := range vfs[:n] {
			d, _ := json.Marshal(vfDetail{Pool: name, PreviousDriver: vf.PreviousDriver})
			rows = append(rows, store.Allocation{Kind: kindVF, Item: vf.Address, Detail: d})
			g.VFs = append(g.VFs, vf)
		}
	}
	d, err := json.Marshal(record{Request: req, Grant: g})
	if err != nil {
		return g, nil, nil, fmt.Errorf("encode grant: %w", err)
	}
	rows = append(rows, store.Allocation{Kind: kindGrant, Item: req.Owner, Detail: d})
	return g, rows, limits, nil
}

// hugepagesShort is the InsufficientError of a hugepage claim the store
// refused.
func (p *Pool) hugepagesShort(ctx context.Context, req Request) error {
	limit, used, err := p.hugepageUse(ctx, req.HugepageSize)
	if err != nil {
		return err
	}
	return &InsufficientError{Resource: HugepageResource(req.HugepageSize), Requested: req.HugepageBytes, Free: max(limit-used, 0)}
}

// hugepageUse is the kernel's pages of size, and what the store grants
// of them.
func (p *Pool) hugepageUse(ctx context.Context, size int64) (limit, used int64, err error) {
	if limit, err = hugepageLimit(p.s.sysfs, size); err != nil {
		return 0, 0, err
	}
	rows, err := p.allocs.Kind(ctx, HugepageResource(size))
	if err != nil {
		return 0, 0, err
	}
	for _, r := range rows {
		used += r.Amount
	}
	return limit, used, nil
}

func (p *Pool) heldCPUs(ctx context.Context) (cpuset.CPUSet, error) {
	rows, err := p.allocs.Kind(ctx, kindCPU)
	if err != nil {
		return cpuset.New(), err
	}
	held := make([]int, 0, len(rows))
	for _, r := range rows {
		c, err := strconv.Atoi(r.Item)
		if err != nil {
			return cpuset.New(), fmt.Errorf("read held cpus: bad row %q of %q", r.Item, r.Owner)
		}
		held = append(held, c)
	}
	return cpuset.New(held...), nil
}

func (p *Pool) heldVFs(ctx context.Context) (map[string]bool, error) {
	rows, err := p.allocs.Kind(ctx, kindVF)
	if err != nil {
		return nil, err
	}
	held := make(map[string]bool, len(rows))
	for _, r := range rows {
		held[r.Item] = true
	}
	return held, nil
}

// freeVFs lists a pool's VFs that nobody holds, in PF and virtfn order,
// with the driver each has now.
func (p *Pool) freeVFs(pool string, held map[string]bool) ([]VF, error) {
	var out []VF
	for _, pf := range p.s.pools[pool] {
		addrs, err := p.sys.vfsOf(pf)
		if err != nil {
			return nil, err
		}
		for _, a := range addrs {
			if held[a] {
				continue
			}
			ok, err := p.sys.free(a)
			if err != nil {
				return nil, err
			}
			if !ok {
				continue
			}
			drv, err := p.sys.driver(a)
			if err != nil {
				return nil, err
			}
			out = append(out, VF{Pool: pool, Address: a, PreviousDriver: drv})
		}
	}
	return out, nil
}

// bind binds each VF to vfio-pci; on a failure it restores the ones it
// bound and returns the error.
func (p *Pool) bind(vfs []VF) error {
	for i, vf := range vfs {
		if err := p.sys.bindVFIO(vf.Address); err != nil {
			errs := []error{err}
			for _, done := range vfs[:i] {
				errs = append(errs, p.sys.restore(done.Address))
			}
			return errors.Join(errs...)
		}
	}
	return nil
}

// ownKinds are the distinct kinds of rows.
func ownKinds(rows []store.Allocation) []string {
	var kinds []string
	for _, r := range rows {
		if !slices.Contains(kinds, r.Kind) {
			kinds = append(kinds, r.Kind)
		}
	}
	return kinds
}

func sameRequest(a, b Request) bool {
	clean := func(m map[string]int) map[string]int {
		out := map[string]int{}
		for k, v := range m {
			if v != 0 {
				out[k] = v
			}
		}
		return out
	}
	return a.Owner == b.Owner && a.DedicatedCPUs == b.DedicatedCPUs && a.HugepageSize == b.HugepageSize &&
		a.HugepageBytes == b.HugepageBytes && maps.Equal(clean(a.VFs), clean(b.VFs))
}

// Release gives back everything owner holds of the pool: its VFs are
// unbound from vfio-pci and re-probed (their previous driver takes them
// back), then its cores, hugepages and VFs are released in one
// transaction. Rows of other kinds of the same owner (a VM record) stay.
// Releasing an owner that holds nothing is not an error. If a VF cannot
// be restored, nothing is released (the VF is not handed out again in a
// state the pool does not know) and the error says which.
func (p *Pool) Release(ctx context.Context, owner string) error {
	cores, err := p.release(ctx, owner)
	if err == nil && cores {
		p.notify(ctx)
	}
	return err
}

// release does Release's work under the lock; cores says whether it
// released dedicated cores.
func (p *Pool) release(ctx context.Context, owner string) (cores bool, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	rows, err := p.allocs.Owner(ctx, owner)
	if err != nil {
		return false, fmt.Errorf("release %q: %w", owner, err)
	}
	var kinds []string
	var errs []error
	for _, r := range rows {
		switch {
		case r.Kind == kindVF:
			if err := p.sys.restore(r.Item); err != nil {
				errs = append(errs, err)
			}
		case r.Kind == kindCPU, r.Kind == kindGrant, strings.HasPrefix(r.Kind, "hugepages-"):
		default:
			continue
		}
		if !slices.Contains(kinds, r.Kind) {
			kinds = append(kinds, r.Kind)
		}
	}
	if err := errors.Join(errs...); err != nil {
		p.requests.WithLabelValues("release_failed").Inc()
		return false, fmt.Errorf("release %q: %w", owner, err)
	}
	if len(kinds) == 0 {
		return false, nil
	}
	if err := p.allocs.ReleaseKinds(ctx, owner, kinds...); err != nil {
		return false, err
	}
	p.logger.Info("resources released", "owner", owner)
	return slices.Contains(kinds, kindCPU), nil
}

// Lookup returns owner's grant as Allocate returned it, from the store
// (also after an EdgeCore restart); ok is false when it holds none.
func (p *Pool) Lookup(ctx context.Context, owner string) (Grant, bool, error) {
	rec, ok, err := p.lookup(ctx, owner)
	return rec.Grant, ok, err
}

func (p *Pool) lookup(ctx context.Context, owner string) (record, bool, error) {
	rows, err := p.allocs.Owner(ctx, owner)
	if err != nil {
		return record{}, false, fmt.Errorf("look up %q: %w", owner, err)
	}
	for _, r := range rows {
		if r.Kind != kindGrant {
			continue
		}
		var rec record
		if err := json.Unmarshal(r.Detail, &rec); err != nil {
			return record{}, false, fmt.Errorf("look up %q: decode grant: %w", owner, err)
		}
		return rec, true, nil
	}
	return record{}, false, nil
}

// SharedCPUs is the shared set now: the node's CPUs less both reserved
// sets less every dedicated core.
func (p *Pool) SharedCPUs(ctx context.Context) ([]int, error) {
	held, err := p.heldCPUs(ctx)
	if err != nil {
		return nil, err
	}
	return p.s.allocatable.Difference(held).List(), nil
}

// Advertisement is what the Node says of the pool.
type Advertisement struct {
	// ReservedSystemCPUs and ReservedDataPlaneCPUs count the reserved
	// cores: not allocatable.
	ReservedSystemCPUs, ReservedDataPlaneCPUs int64
	// VFs maps each pool's extended resource,
	// sriov.edge.tether.dev/<pool>, to its VFs: sriov_numvfs summed over
	// its PFs (VFs bound to vfio-pci by someone else included; the pool
	// does not hand those out).
	VFs map[string]int64
}

// Advertise reads what the Node advertises of the pool.
func (p *Pool) Advertise() (Advertisement, error) {
	a := Advertisement{
		ReservedSystemCPUs: int64(p.s.reserved.Size()), ReservedDataPlaneCPUs: int64(p.s.dataPlane.Size()),
		VFs: make(map[string]int64, len(p.s.poolNames)),
	}
	for _, name := range p.s.poolNames {
		var n int64
		for _, pf := range p.s.pools[name] {
			vfs, err := p.sys.vfsOf(pf)
			if err != nil {
				return a, fmt.Errorf("advertise pool %s: %w", name, err)
			}
			n += int64(len(vfs))
		}
		a.VFs[ResourcePrefixVF+name] = n
	}
	return a, nil
}
