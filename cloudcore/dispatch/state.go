// Package dispatch serves the sync protocol on CloudCore's side of each
// edge session. It decides what CloudCore sends to one edge node with a
// pure state machine (Node) fed with changes, sync messages, acks and
// clock ticks; Serve is the thin I/O around it: one receive path that
// routes each message by kind to one handler per concern (object sync,
// upstream writes, certificate renewal). It reads objects from the
// informer cache only, never lists or gets from the API server, and
// writes to it only through Upstream and Renewer.
package dispatch

import (
	"fmt"
	"slices"
	"time"

	"github.com/tetheredge/tether/common/objsync"
)

// ActionKind says what the loop must send.
type ActionKind int

// Actions.
const (
	// SendObject: send the object Key at its current version (Object).
	SendObject ActionKind = iota + 1
	// SendDelete: tell the edge to delete Key.
	SendDelete
	// SendWant: ask the edge for the entries of Buckets.
	SendWant
	// SendPrune: tell the edge to delete the objects with key Hashes.
	SendPrune
	// SendDone: the reconcile has queued every difference.
	SendDone
)

// Action is one message the loop must send. ID is the message id to use.
type Action struct {
	Kind    ActionKind
	ID      uint64
	Key     objsync.Key
	Object  any // what Lookup returned for Key, for SendObject (nil when the loop encodes at send time)
	Buckets []uint64
	// Sub, on SendWant, are the digests of the wanted buckets' sub-buckets
	// (objsync.SubDigest), or nil to have them listed whole.
	Sub    []uint64
	Hashes []uint64
	// Differences, on SendDone, is the reconcile's size: the objects it
	// found missing or at another version at the edge (queued to be sent)
	// plus the hashes it pruned.
	Differences int
}

// Lookup reads the node's desired state (the informer cache): the keys it
// should hold, and for one key its version hash and object if it belongs.
type Lookup interface {
	Keys() []objsync.Key
	Lookup(key objsync.Key) (version uint64, object any, ok bool)
}

type phase int

const (
	phaseAwaitDigest phase = iota
	phaseAwaitList
	phaseLive
)

type flight struct {
	id      uint64
	version uint64 // what the edge holds once acked; 0 with del
	del     bool
	sentAt  time.Time
}

// Config tunes the dispatcher. Zero values mean the defaults written
// beside them. Window, ResendAfter and MaxEntries are the state machine's
// (Node); the Upstream fields bound what one session may ask of the API
// server (Dispatcher).
type Config struct {
	// Window is how many object messages may await an ack. Default 256.
	Window int
	// ResendAfter is how long an unacked message waits before it is sent
	// again. Default 10s.
	ResendAfter time.Duration
	// MaxEntries is the most key hashes in one Prune message, and the
	// slack allowed beyond the digest's Count for the entries of one
	// reconcile's Lists. Default objsync.MaxEntries; tests make it small.
	MaxEntries int
	// UpstreamQPS is each session's sustained rate of upstream writes,
	// per second; writes over it are answered with a Retry and never
	// reach the API server. Default 20; negative means no limit.
	UpstreamQPS float64
	// UpstreamBurst is how many upstream writes a session may make at
	// once above that rate. Default 120: a reconnecting node's Node,
	// Lease and the statuses of the 110 pods kubelet allows by default.
	UpstreamBurst int
	// UpstreamQueue is how many upstream writes of one session may wait
	// for the API server; more are answered with a Retry. Default 64.
	UpstreamQueue int
}

// Defaults of Config.
const (
	DefaultWindow        = 256
	DefaultResendAfter   = 10 * time.Second
	DefaultUpstreamQPS   = 20
	DefaultUpstreamBurst = 120
	DefaultUpstreamQueue = 64
)

func (c Config) withDefaults() Config {
	if c.Window <= 0 {
		c.Window = DefaultWindow
	}
	if c.ResendAfter <= 0 {
		c.ResendAfter = DefaultResendAfter
	}
	if c.MaxEntries <= 0 || c.MaxEntries > objsync.MaxEntries {
		c.MaxEntries = objsync.MaxEntries
	}
	if c.UpstreamQPS == 0 {
		c.UpstreamQPS = DefaultUpstreamQPS
	}
	if c.UpstreamBurst <= 0 {
		c.UpstreamBurst = DefaultUpstreamBurst
	}
	if c.UpstreamQueue <= 0 {
		c.UpstreamQueue = DefaultUpstreamQueue
	}
	return c
}

// Node is the sync state of one edge node during one session. It starts
// waiting for the edge's digest; nothing is sent before the reconcile has
// established what the edge holds.
//
// Invariants:
//   - message ids are strictly increasing for the life of the Node (the
//     session), across resends and across a new digest, so the edge can
//     tell a stale message for a key from a newer one by its id alone
//     (docs/protocol.md, "Message ids");
//   - at most one message per key awaits an ack; a resend after
//     ResendAfter forgets the old id and sends the version current at
//     send time under a new one;
//   - the queue holds keys, not versions, and the version sent is the
//     newest at send time (coalescing);
//   - what a reconcile keeps of the edge's lists is bounded by the
//     digest's Count plus MaxEntries.
type Node struct {
	cfg    Config
	phase  phase
	nextID uint64

	edge     map[objsync.Key]uint64 // version hash the edge is known to hold
	unsure   map[objsync.Key]bool   // a forgotten message may still reach the edge
	queue    []objsync.Key
	queued   map[objsync.Key]bool
	inflight map[objsync.Key]flight
	byID     map[uint64]objsync.Key
	prunes   map[uint64]bool // prune messages awaiting an ack

	nb        int
	wanted    map[int]bool
	fan       int               // sub-buckets per wanted bucket in the want (1: none)
	subs      map[uint64]bool   // the sub-buckets listed so far (among nb·fan); nil: the lists name none, they hold whole buckets
	held      map[uint64]uint64 // entries of the wanted buckets listed so far
	listed    int               // entries received in this reconcile's lists
	maxListed int               // the bound on listed: Count + MaxEntries
}

// NewNode returns the state of a freshly connected node.
func NewNode(cfg Config) *Node {
	n := &Node{cfg: cfg.withDefaults()}
	n.reset()
	return n
}

// reset forgets everything learnt about the edge, but not the last id.
func (n *Node) reset() {
	n.phase = phaseAwaitDigest
	n.edge = make(map[objsync.Key]uint64)
	// The maps that are empty once the edge is in sync start nil, are
	// made by their first insert and let go once empty (release).
	n.unsure = nil
	n.queue = nil
	n.queued = nil
	n.inflight, n.byID = nil, nil
	n.prunes = nil
	n.nb, n.wanted, n.held, n.listed, n.maxListed = 0, nil, nil, 0, 0
	n.fan, n.subs = 1, nil
}

// Live reports whether the reconcile is over and changes flow.
func (n *Node) Live() bool { return n.phase == phaseLive }

// InFlight returns how many messages await an ack.
func (n *Node) InFlight() int { return len(n.inflight) + len(n.prunes) }

// Held returns how many objects the edge is known to hold.
func (n *Node) Held() int { return len(n.edge) }

// Queued returns how many keys wait to be evaluated.
func (n *Node) Queued() int { return len(n.queue) }

func (n *Node) id() uint64 {
	n.nextID++
	return n.nextID
}

// Changed records that key may differ between cloud and edge.
func (n *Node) Changed(key objsync.Key) {
	if n.queued[key] {
		return
	}
	if n.queued == nil {
		n.queued = make(map[objsync.Key]bool)
	}
	n.queued[key] = true
	n.queue = append(n.queue, key)
}

// track records f, a message for key, as awaiting its ack.
func (n *Node) track(key objsync.Key, f flight) {
	if n.inflight == nil {
		n.inflight, n.byID = make(map[objsync.Key]flight), make(map[uint64]objsync.Key)
	}
	n.inflight[key] = f
	n.byID[f.id] = key
}

// release lets go of the maps that have become empty: a Go map keeps its
// memory when emptied, and a live session spends nearly all its time with
// nothing queued, in flight or unsure, holding only edge. Reads and
// deletes work on the nil maps; inserts make them again (Changed, track).
func (n *Node) release() {
	if len(n.queued) == 0 {
		n.queued = nil
	}
	if len(n.inflight) == 0 {
		n.inflight, n.byID = nil, nil
	}
	if len(n.prunes) == 0 {
		n.prunes = nil
	}
	if len(n.unsure) == 0 {
		n.unsure = nil
	}
}

// OnDigest starts a reconcile: it forgets what it knew of the edge (a
// digest in a live session starts over; ids keep increasing) and compares
// the edge's digest with the desired state. Buckets that match are in
// sync; for the others it asks for the edge's entries, or, when the edge
// holds nothing, queues every desired key at once. When the edge takes
// sub-buckets and the wanted buckets are large enough for it to pay
// (objsync.Fanout), the want carries the sub-buckets' digests.
func (n *Node) OnDigest(d objsync.Sync, desired Lookup) []Action {
	n.reset()
	n.nb = len(d.Buckets)
	keys := desired.Keys()
	type kv struct {
		key objsync.Key
		h   uint64
		v   uint64
	}
	byBucket := make(map[int][]kv)
	cloud := objsync.NewDigest(n.nb)
	for _, k := range keys {
		v, _, ok := desired.Lookup(k)
		if !ok {
			continue
		}
		h := k.Hash()
		cloud.Add(objsync.Entry{Key: h, Version: v})
		b := objsync.Bucket(h, n.nb)
		byBucket[b] = append(byBucket[b], kv{k, h, v})
	}
	diff := cloud.Diff(d.Buckets)
	n.wanted = make(map[int]bool, len(diff))
	for _, b := range diff {
		n.wanted[int(b)] = true
	}
	for b, objs := range byBucket {
		if n.wanted[b] {
			continue
		}
		for _, o := range objs {
			n.edge[o.key] = o.v
		}
	}
	if len(diff) == 0 {
		n.phase = phaseLive
		return []Action{{Kind: SendDone, ID: n.id()}}
	}
	if d.Count == 0 {
		// An empty edge: everything desired is missing, nothing to prune.
		missing := 0
		for b := range n.wanted {
			for _, o := range byBucket[b] {
				n.Changed(o.key)
				missing++
			}
		}
		n.phase = phaseLive
		return []Action{{Kind: SendDone, ID: n.id(), Differences: missing}}
	}
	n.phase = phaseAwaitList
	n.held = make(map[uint64]uint64)
	n.maxListed = int(d.Count) + n.cfg.MaxEntries
	want := make([]uint64, len(diff))
	inWanted := 0
	for i, b := range diff {
		want[i] = uint64(b)
		inWanted += len(byBucket[int(b)])
	}
	var sub []uint64
	if d.Caps&objsync.CapSubBuckets != 0 {
		perBucket := max(inWanted/len(diff), int(d.Count)/n.nb)
		if fan := objsync.Fanout(perBucket); fan > 1 && len(diff)*fan <= objsync.MaxBuckets {
			sd := objsync.NewSubDigest(n.nb, fan, want)
			for _, b := range diff {
				for _, o := range byBucket[int(b)] {
					sd.Add(objsync.Entry{Key: o.h, Version: o.v})
				}
			}
			n.fan, sub = fan, sd.Sums
		}
	}
	return []Action{{Kind: SendWant, ID: n.id(), Buckets: want, Sub: sub}}
}

// OnList takes one List of the edge's entries of the wanted buckets. While
// More is set it only accumulates. On the last List, objects the edge
// holds at another version, or lacks, are queued, and objects it holds but
// should not are pruned, in messages of at most MaxEntries hashes, before
// Done.
//
// A List with objsync.CapSubBuckets names the sub-buckets it lists; the
// objects of the wanted buckets' other sub-buckets are in sync, as those
// of equal buckets are.
//
// A List nobody asked for returns ErrUnexpectedList and changes nothing. A
// reconcile whose Lists exceed the digest's Count by more than MaxEntries
// returns ErrListTooLong, and one that names a sub-bucket of no wanted
// bucket ErrBadList; either is abandoned: nothing is sent until the next
// digest.
func (n *Node) OnList(l objsync.Sync, desired Lookup) ([]Action, error) {
	if n.phase != phaseAwaitList {
		return nil, ErrUnexpectedList
	}
	n.listed += len(l.Entries)
	if n.listed > n.maxListed {
		listed, limit := n.listed, n.maxListed
		n.reset()
		return nil, fmt.Errorf("%w: %d entries, the digest announced %d objects (slack %d)", ErrListTooLong, listed, limit-n.cfg.MaxEntries, n.cfg.MaxEntries)
	}
	if l.Caps&objsync.CapSubBuckets != 0 {
		if n.subs == nil {
			n.subs = make(map[uint64]bool, len(l.Buckets))
		}
		for _, c := range l.Buckets {
			if c >= uint64(n.nb*n.fan) || !n.wanted[int(c&uint64(n.nb-1))] {
				nb, fan := n.nb, n.fan
				n.reset()
				return nil, fmt.Errorf("%w: sub-bucket %d of %d·%d", ErrBadList, c, nb, fan)
			}
			n.subs[c] = true
		}
	}
	for _, e := range l.Entries {
		if n.wanted[objsync.Bucket(e.Key, n.nb)] {
			n.held[e.Key] = e.Version
		}
	}
	if l.More {
		return nil, nil
	}
	held := n.held
	listedSub := func(h uint64) bool { return n.subs == nil || n.subs[uint64(objsync.Bucket(h, n.nb*n.fan))] }
	differ := 0
	for _, k := range desired.Keys() {
		h := k.Hash()
		if !n.wanted[objsync.Bucket(h, n.nb)] {
			continue
		}
		if !listedSub(h) {
			// In a sub-bucket the edge found equal: in sync.
			if v, _, ok := desired.Lookup(k); ok {
				n.edge[k] = v
			}
			continue
		}
		v, ok := held[h]
		if ok {
			n.edge[k] = v
			delete(held, h)
		}
		if want, _, exists := desired.Lookup(k); exists && (!ok || v != want) {
			differ++
		}
		n.Changed(k)
	}
	hashes := make([]uint64, 0, len(held))
	for h := range held {
		if listedSub(h) { // an entry outside the sub-buckets listed says nothing
			hashes = append(hashes, h)
		}
	}
	slices.Sort(hashes)
	var actions []Action
	for chunk := range slices.Chunk(hashes, n.cfg.MaxEntries) {
		id := n.id()
		if n.prunes == nil {
			n.prunes = make(map[uint64]bool)
		}
		n.prunes[id] = true
		actions = append(actions, Action{Kind: SendPrune, ID: id, Hashes: chunk})
	}
	n.phase = phaseLive
	n.wanted, n.held, n.subs = nil, nil, nil
	return append(actions, Action{Kind: SendDone, ID: n.id(), Differences: differ + len(hashes)}), nil
}

// OnAck records that the edge committed message id. Unknown ids (late
// duplicates, acks from before a resend) are ignored.
func (n *Node) OnAck(id uint64) {
	if n.prunes[id] {
		delete(n.prunes, id)
		return
	}
	key, ok := n.byID[id]
	if !ok {
		return
	}
	f := n.inflight[key]
	delete(n.byID, id)
	delete(n.inflight, key)
	delete(n.unsure, key) // anything older that arrives later is stale
	if f.del {
		delete(n.edge, key)
	} else {
		n.edge[key] = f.version
	}
}

// OnRefused records that the edge refused message id. The key is not
// retried until it changes again: sending the same bytes would be refused
// the same way.
func (n *Node) OnRefused(id uint64) {
	delete(n.prunes, id)
	if key, ok := n.byID[id]; ok {
		delete(n.byID, id)
		delete(n.inflight, key)
	}
}

// Tick re-queues messages unacked for longer than ResendAfter. Their ids
// are forgotten: Next sends the key again, at its version then, under a
// new and higher id, so the edge drops the first message if it arrives
// late. Until a message for the key is acked, the cloud no longer knows
// what the edge holds for it: the next message is sent even if it looks
// redundant (a delete of a key the edge may never have received).
func (n *Node) Tick(now time.Time) {
	for key, f := range n.inflight {
		if now.Sub(f.sentAt) >= n.cfg.ResendAfter {
			delete(n.byID, f.id)
			delete(n.inflight, key)
			if n.unsure == nil {
				n.unsure = make(map[objsync.Key]bool)
			}
			n.unsure[key] = true
			n.Changed(key)
		}
	}
}

// Next returns the messages to send now: queued keys whose desired state
// differs from what the edge holds, while the window has room. Keys with a
// message in flight wait for its ack.
func (n *Node) Next(now time.Time, desired Lookup) []Action {
	if n.phase != phaseLive {
		return nil
	}
	var actions []Action
	var deferred []objsync.Key
	for len(n.queue) > 0 && len(n.inflight) < n.cfg.Window {
		key := n.queue[0]
		n.queue = n.queue[1:]
		if _, busy := n.inflight[key]; busy {
			deferred = append(deferred, key)
			continue
		}
		delete(n.queued, key)
		v, obj, ok := desired.Lookup(key)
		held, has := n.edge[key]
		unsure := n.unsure[key]
		switch {
		case ok && (!has || held != v || unsure):
			id := n.id()
			n.track(key, flight{id: id, version: v, sentAt: now})
			actions = append(actions, Action{Kind: SendObject, ID: id, Key: key, Object: obj})
		case !ok && (has || unsure):
			id := n.id()
			n.track(key, flight{id: id, del: true, sentAt: now})
			actions = append(actions, Action{Kind: SendDelete, ID: id, Key: key})
		}
	}
	n.queue = append(n.queue, deferred...)
	if len(n.queue) == 0 {
		n.queue = nil // let a drained queue's array go
	}
	n.release()
	return actions
}
