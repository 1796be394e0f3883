package dispatch

import (
	"context"
	"sync"

	"github.com/tetheredge/tether/common/message"
)

// lane runs one session's work of one concern (upstream writes,
// certificate renewals) one message at a time, in the order offered, on
// a goroutine that runs only while there is work: the first message
// offered to an idle lane starts it, and it exits once the queue is
// empty. An idle session, nearly always idle in both concerns (a lease
// renewal every few seconds, a certificate renewal a year), thus holds no
// goroutine for them.
//
// Its goroutines run in the session's group (conn.spawn), so none
// outlives the session.
type lane struct {
	// limit is how many messages may wait, besides the one being worked
	// on.
	limit int
	work  func(ctx context.Context, m *message.Message) error

	mu      sync.Mutex
	q       []*message.Message // waiting, oldest first; nil when empty
	running bool               // a goroutine is draining q
}

// push queues m. queued is false, and nothing changes, when limit
// messages already wait; start is true when the caller must start run,
// the lane having been idle.
func (l *lane) push(m *message.Message) (queued, start bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.q) >= l.limit {
		return false, false
	}
	l.q = append(l.q, m)
	start = !l.running
	l.running = true
	return true, start
}

// run works on the queued messages until none is left, ctx ends or work
// fails. The next push after it returns starts a new run.
func (l *lane) run(ctx context.Context) error {
	for {
		l.mu.Lock()
		if len(l.q) == 0 || ctx.Err() != nil {
			l.q, l.running = nil, false
			l.mu.Unlock()
			return nil
		}
		m := l.q[0]
		l.q[0] = nil
		l.q = l.q[1:]
		l.mu.Unlock()
		if err := l.work(ctx, m); err != nil {
			l.mu.Lock()
			l.q, l.running = nil, false
			l.mu.Unlock()
			return err
		}
	}
}
