package tunnel

import (
	"sync"

	"github.com/tetheredge/tether/common/message"
)

// inbox holds the messages received for Recv: at most limit, oldest
// first. It holds no buffer while empty, where a channel of the same bound
// would hold limit slots in every idle session.
type inbox struct {
	limit int
	ready chan struct{} // capacity 1: a message may be waiting
	space chan struct{} // capacity 1: there may be room

	mu sync.Mutex
	q  []*message.Message
}

func newInbox(limit int) *inbox {
	return &inbox{limit: limit, ready: make(chan struct{}, 1), space: make(chan struct{}, 1)}
}

// signal wakes one waiter of c, or the next to wait.
func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// put queues m, waiting for room until done is closed; it reports whether
// m was queued.
func (b *inbox) put(m *message.Message, done <-chan struct{}) bool {
	for {
		b.mu.Lock()
		if len(b.q) < b.limit {
			b.q = append(b.q, m)
			room := len(b.q) < b.limit
			b.mu.Unlock()
			signal(b.ready)
			if room {
				signal(b.space) // another put may be waiting
			}
			return true
		}
		b.mu.Unlock()
		select {
		case <-b.space:
		case <-done:
			return false
		}
	}
}

// take returns the oldest message; ok is false when there is none.
func (b *inbox) take() (m *message.Message, ok bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.q) == 0 {
		return nil, false
	}
	m = b.q[0]
	b.q[0] = nil
	b.q = b.q[1:]
	if len(b.q) == 0 {
		b.q = nil // let the buffer go
	} else {
		signal(b.ready) // another Recv may be waiting
	}
	signal(b.space)
	return m, true
}
