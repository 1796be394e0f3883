package syncer

import (
	"time"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/edgecore/store"
)

// ActionKind says what the loop must do.
type ActionKind int

// Actions. Those that read or write the store have an answer the loop
// must feed back: its method is named beside each.
const (
	// ReadInventory: read the store's inventory; answer OnInventory or
	// OnInventoryFailed.
	ReadInventory ActionKind = iota + 1
	// SendSync: send Sync (a digest or one chunk of a list).
	SendSync
	// ApplyChanges: apply Changes in one transaction; answer OnCommitted
	// or OnCommitFailed.
	ApplyChanges
	// PruneHashes: delete the objects with key Hashes in one transaction;
	// answer OnCommitted or OnCommitFailed.
	PruneHashes
	// SendAck: ack the cloud's message ReplyTo.
	SendAck
	// SendRefuse: refuse the cloud's message ReplyTo; Reason is the metric
	// label, Detail the text the cloud gets.
	SendRefuse
	// ReadOutbox: read up to Limit pending outbox items; answer OnOutbox
	// or OnOutboxFailed.
	ReadOutbox
	// SendUpstream: send Item; if the session says it is too large
	// (message.ErrFrameTooLarge), answer OnTooLarge.
	SendUpstream
	// OutboxDone: remove Item from the outbox (store.Done). Outcome says
	// why; Detail is the cloud's reason for a refusal.
	OutboxDone
	// DeliverRenewal: hand Msg to the Renew call waiting for it.
	DeliverRenewal
	// Report: the cloud refused a message the machine cannot match (a
	// digest or list, an item replaced since); log Detail, rate-limited
	// by Reason. Nothing else to do.
	Report
	// Reconciled: the cloud has queued every difference (log it).
	Reconciled
)

// Outcome is why an outbox item is removed.
type Outcome int

// Outcomes of an upstream write.
const (
	// Acked: the cloud wrote it (or already held the same or newer).
	Acked Outcome = iota + 1
	// Refused: the cloud refused it for good.
	Refused
	// TooLarge: it exceeds the frame limit and can never be sent.
	TooLarge
)

// Action is one thing the loop must do.
type Action struct {
	Kind    ActionKind
	ReplyTo uint64
	Reason  string
	Detail  string
	Sync    *objsync.Sync
	Changes []store.Change
	Hashes  []uint64
	Limit   int
	Item    store.OutboxItem
	Outcome Outcome
	Msg     *message.Message
}

// Stats are the counters of one session's state machine, for metrics and
// tests. They only grow.
type Stats struct {
	// Applied and Batches count committed events and transactions.
	Applied, Batches int
	// Stale counts events (and prune hashes) not applied because the edge
	// had applied a newer message for the key.
	Stale int
	// Pruned counts key hashes committed by prunes.
	Pruned int
	// StoreFailures counts failed store reads and writes retried later.
	StoreFailures int
	// Overflow counts events dropped unacked because too many waited for
	// the store (the cloud sends them again).
	Overflow int
	// UpstreamAcked, UpstreamRefused, UpstreamRetried, UpstreamResent and
	// UpstreamTooLarge count upstream answers and resends.
	UpstreamAcked, UpstreamRefused, UpstreamRetried, UpstreamResent, UpstreamTooLarge int
}

// renewIDBase starts the ids of renewal requests, far from outbox
// sequence numbers, so that their answers are never taken for upstream
// answers.
const renewIDBase = 1 << 62

// Edge is the sync state of this node during one session: the pure core of
// the syncer. It does no I/O and starts no goroutines; the loop in Serve
// feeds it what happens (Start, Receive, the answers of the store, Tick)
// and does the Actions it returns, in order. It has two concerns, each
// with its own state: object sync (objects.go: digest, want/list, events,
// prunes, acks) and the upstream outbox (upstream.go: the window of writes
// awaiting the cloud's answer). Renewal answers are routed to the Renew
// call that waits for them.
//
// Invariants:
//   - An event or prune is acked only after OnCommitted for the
//     transaction that holds it (or, if it is stale, after the commit of
//     the batch it arrived in, or at once when its batch has nothing to
//     write). A failed transaction acks nothing; it is retried with
//     back-off, never dropped, except an invalid event, which is refused.
//   - At most one transaction is outstanding; events are applied in
//     arrival order.
//   - Per key hash, the edge never applies a message whose id is lower than
//     that of the last event or prune it applied for the key (protocol
//     contract: the cloud's ids increase within a session).
//   - Every upstream item is either in the window (sent, awaiting an
//     answer) or waiting (not before its back-off). An answer, a newer
//     item for the key, or ResendAfter without an answer takes it out of
//     the window, so the window cannot leak, even if the cloud never
//     answers.
//   - Tick(now) does everything due at now, so Deadline after it is
//     later than now: the loop's timer never spins.
type Edge struct {
	cfg   Config
	codec *message.Codec
	obj   objects
	up    upstream
	stats Stats
}

// NewEdge returns the state of a freshly started session.
func NewEdge(cfg Config) *Edge {
	cfg = cfg.withDefaults()
	return &Edge{
		cfg:   cfg,
		codec: message.NewCodec(0),
		obj:   newObjects(),
		up:    newUpstream(),
	}
}

// Stats returns the counters so far.
func (e *Edge) Stats() Stats { return e.stats }

// Start begins the session: read the inventory for the digest, and the
// outbox.
func (e *Edge) Start(now time.Time) []Action {
	acts := e.obj.start()
	e.up.dirty = true
	return append(acts, e.pumpUpstream(now)...)
}

// Receive takes one message from the cloud and routes it by kind to the
// concern it belongs to.
func (e *Edge) Receive(now time.Time, m *message.Message) []Action {
	switch m.Kind {
	case message.KindEvent:
		return e.receiveEvent(now, m)
	case message.KindSync:
		return e.receiveSync(now, m)
	case message.KindRenew:
		if m.ReplyTo >= renewIDBase {
			return []Action{{Kind: DeliverRenewal, Msg: m}}
		}
		return refuse(m.ID, "unexpected_kind", "renewal answer without a request")
	case message.KindAck, message.KindRefuse, message.KindRetry:
		if m.ReplyTo >= renewIDBase {
			return []Action{{Kind: DeliverRenewal, Msg: m}}
		}
		return e.receiveAnswer(now, m)
	default:
		return refuse(m.ID, "unexpected_kind", "the edge does not take "+m.Kind.String()+" messages")
	}
}

// Tick does what is due at now: a store operation to retry, an upstream
// write to send again.
func (e *Edge) Tick(now time.Time) []Action {
	acts := e.obj.tick(now)
	acts = append(acts, e.tickUpstream(now)...)
	return acts
}

// Deadline returns when Tick must next be called; ok is false if nothing
// is scheduled.
func (e *Edge) Deadline() (t time.Time, ok bool) {
	earliest := func(c time.Time) {
		if !c.IsZero() && (!ok || c.Before(t)) {
			t, ok = c, true
		}
	}
	earliest(e.obj.deadline())
	earliest(e.up.deadline(e.cfg))
	return t, ok
}

func refuse(id uint64, reason, detail string) []Action {
	return []Action{{Kind: SendRefuse, ReplyTo: id, Reason: reason, Detail: detail}}
}

// backoff returns min·2^(failures-1), at most max.
func backoff(failures int, minD, maxD time.Duration) time.Duration {
	d := minD
	for i := 1; i < failures && d < maxD; i++ {
		d *= 2
	}
	return min(d, maxD)
}
