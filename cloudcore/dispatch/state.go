// Package dispatch decides what CloudCore sends to one edge node and
// sends it: a pure state machine (Node) fed with changes, sync messages,
// acks and clock ticks, and a thin loop (Serve) around it that reads the
// informer cache and talks to the tunnel session. It never lists or gets
// from the API server.
package dispatch

import (
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
	Hashes  []uint64
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

// Config tunes a Node. Zero values mean the defaults written beside them.
type Config struct {
	// Window is how many object messages may await an ack. Default 256.
	Window int
	// ResendAfter is how long an unacked message waits before it is sent
	// again. Default 10s.
	ResendAfter time.Duration
}

func (c Config) withDefaults() Config {
	if c.Window <= 0 {
		c.Window = 256
	}
	if c.ResendAfter <= 0 {
		c.ResendAfter = 10 * time.Second
	}
	return c
}

// Node is the sync state of one edge node during one session. It starts
// waiting for the edge's digest; nothing is sent before the reconcile has
// established what the edge holds.
//
// Invariants: at most one message per key is in flight, so the edge sees
// one object's versions in the order the cloud saw them; the queue holds
// keys, not versions, and the version sent is the newest at send time
// (coalescing).
type Node struct {
	cfg    Config
	phase  phase
	nextID uint64

	edge     map[objsync.Key]uint64 // version hash the edge is known to hold
	queue    []objsync.Key
	queued   map[objsync.Key]bool
	inflight map[objsync.Key]flight
	byID     map[uint64]objsync.Key
	prunes   map[uint64]bool // prune messages awaiting an ack

	nb     int
	wanted map[int]bool
}

// NewNode returns the state of a freshly connected node.
func NewNode(cfg Config) *Node {
	return &Node{
		cfg:      cfg.withDefaults(),
		edge:     make(map[objsync.Key]uint64),
		queued:   make(map[objsync.Key]bool),
		inflight: make(map[objsync.Key]flight),
		byID:     make(map[uint64]objsync.Key),
		prunes:   make(map[uint64]bool),
	}
}

// Live reports whether the reconcile is over and changes flow.
func (n *Node) Live() bool { return n.phase == phaseLive }

// InFlight returns how many messages await an ack.
func (n *Node) InFlight() int { return len(n.inflight) + len(n.prunes) }

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
	n.queued[key] = true
	n.queue = append(n.queue, key)
}

// OnDigest compares the edge's digest with the desired state. Buckets that
// match are in sync; for the others it asks for the edge's entries, or,
// when the edge holds nothing, queues every desired key at once.
func (n *Node) OnDigest(d objsync.Sync, desired Lookup) []Action {
	n.nb = len(d.Buckets)
	keys := desired.Keys()
	type kv struct {
		key objsync.Key
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
		byBucket[b] = append(byBucket[b], kv{k, v})
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
		for b := range n.wanted {
			for _, o := range byBucket[b] {
				n.Changed(o.key)
			}
		}
		n.phase = phaseLive
		return []Action{{Kind: SendDone, ID: n.id()}}
	}
	n.phase = phaseAwaitList
	want := make([]uint64, len(diff))
	for i, b := range diff {
		want[i] = uint64(b)
	}
	return []Action{{Kind: SendWant, ID: n.id(), Buckets: want}}
}

// OnList takes the edge's entries of the wanted buckets: objects it holds
// at another version, or lacks, are queued; objects it holds but should
// not are pruned.
func (n *Node) OnList(l objsync.Sync, desired Lookup) []Action {
	if n.phase != phaseAwaitList {
		return nil // a list nobody asked for (or a duplicate) changes nothing
	}
	held := make(map[uint64]uint64, len(l.Entries))
	for _, e := range l.Entries {
		if n.wanted[objsync.Bucket(e.Key, n.nb)] {
			held[e.Key] = e.Version
		}
	}
	for _, k := range desired.Keys() {
		h := k.Hash()
		if !n.wanted[objsync.Bucket(h, n.nb)] {
			continue
		}
		if v, ok := held[h]; ok {
			n.edge[k] = v
			delete(held, h)
		}
		n.Changed(k)
	}
	var actions []Action
	if len(held) > 0 {
		hashes := make([]uint64, 0, len(held))
		for h := range held {
			hashes = append(hashes, h)
		}
		id := n.id()
		n.prunes[id] = true
		actions = append(actions, Action{Kind: SendPrune, ID: id, Hashes: hashes})
	}
	n.phase = phaseLive
	n.wanted = nil
	return append(actions, Action{Kind: SendDone, ID: n.id()})
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

// Tick re-queues messages unacked for longer than ResendAfter.
func (n *Node) Tick(now time.Time) {
	for key, f := range n.inflight {
		if now.Sub(f.sentAt) >= n.cfg.ResendAfter {
			delete(n.byID, f.id)
			delete(n.inflight, key)
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
		switch {
		case ok && (!has || held != v):
			id := n.id()
			n.inflight[key] = flight{id: id, version: v, sentAt: now}
			n.byID[id] = key
			actions = append(actions, Action{Kind: SendObject, ID: id, Key: key, Object: obj})
		case !ok && has:
			id := n.id()
			n.inflight[key] = flight{id: id, del: true, sentAt: now}
			n.byID[id] = key
			actions = append(actions, Action{Kind: SendDelete, ID: id, Key: key})
		}
	}
	n.queue = append(n.queue, deferred...)
	if len(n.queue) == 0 {
		n.queue = nil // let a drained queue's array go
	}
	return actions
}
