package onboard

import (
	"net"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// DefaultSourceRate is Config.SourceRate's default: joins per second and
// source.
const DefaultSourceRate rate.Limit = 1

// Defaults of the join endpoint's other limits (see Config).
const (
	DefaultSourceBurst = 5
	DefaultMaxSources  = 10000
	DefaultMaxConns    = 256
	// DefaultClientQPS and DefaultClientBurst size the join endpoint's own
	// Kubernetes client (cloudcore/app gives it one, apart from the
	// client that serves renewals, the whitelist and the edges' writes).
	DefaultClientQPS   = 20
	DefaultClientBurst = 40
)

// sourceLimiter is a token bucket per source address, in a bounded map.
// Joins are rare (once per node, by hand), so the limit is low and a
// flood from one source costs no more than its bucket; the API requests a
// well-formed token costs are what it protects.
//
// Bound: at most max sources are remembered. When the map is full, the
// sources whose bucket has refilled (idle for burst/rate) are forgotten,
// which changes nothing for them; if it is still full, the new source
// shares one overflow bucket with every other source not remembered, so
// many sources together cost no more than one more.
type sourceLimiter struct {
	rate  rate.Limit
	burst int
	max   int

	mu       sync.Mutex
	sources  map[netip.Prefix]*sourceBucket
	overflow *rate.Limiter
}

type sourceBucket struct {
	lim  *rate.Limiter
	seen time.Time
}

func newSourceLimiter(r rate.Limit, burst, maxSources int) *sourceLimiter {
	return &sourceLimiter{
		rate: r, burst: burst, max: maxSources,
		sources:  make(map[netip.Prefix]*sourceBucket),
		overflow: rate.NewLimiter(r, burst),
	}
}

// allow reports whether one request from remote (host:port) may go on at
// now.
func (l *sourceLimiter) allow(remote string, now time.Time) bool {
	src := sourceOf(remote)
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.sources[src]
	if b == nil {
		if len(l.sources) >= l.max {
			l.forgetRefilled(now)
		}
		if len(l.sources) >= l.max {
			return l.overflow.AllowN(now, 1)
		}
		b = &sourceBucket{lim: rate.NewLimiter(l.rate, l.burst)}
		l.sources[src] = b
	}
	b.seen = now
	return b.lim.AllowN(now, 1)
}

// forgetRefilled drops the sources idle long enough for a full bucket.
func (l *sourceLimiter) forgetRefilled(now time.Time) {
	refill := time.Duration(float64(l.burst) / float64(l.rate) * float64(time.Second))
	for k, b := range l.sources {
		if now.Sub(b.seen) >= refill {
			delete(l.sources, k)
		}
	}
}

// sourceOf is the source a request is limited as: its IPv4 address, or
// the /64 of its IPv6 address (one site holds a whole /64). An address
// that does not parse is one source of its own kind.
func sourceOf(remote string) netip.Prefix {
	host, _, err := net.SplitHostPort(remote)
	if err != nil {
		host = remote
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return netip.Prefix{}
	}
	ip = ip.Unmap()
	bits := 32
	if ip.Is6() {
		bits = 64
	}
	p, _ := ip.Prefix(bits) // bits fits the address family
	return p
}
