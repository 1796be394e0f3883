package cri

import (
	"context"
	"sync"
)

// SubscriberBuffer is each subscription's channel capacity in a Broker.
const SubscriberBuffer = 256

// Broker fans a backend's events out to its subscriptions: what an
// EventSource's Events returns. A subscription that has no room for an
// event loses it (Publish counts them), so a consumer keeps a relist as its
// safety net. Backends share it; the zero value is not usable, NewBroker is.
type Broker struct {
	mu     sync.Mutex
	subs   map[chan Event]struct{}
	closed bool
}

// NewBroker returns a broker with no subscriptions.
func NewBroker() *Broker { return &Broker{subs: map[chan Event]struct{}{}} }

// Subscribe returns a new subscription, closed when ctx ends or the broker
// is closed.
func (k *Broker) Subscribe(ctx context.Context) <-chan Event {
	ch := make(chan Event, SubscriberBuffer)
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closed {
		close(ch)
		return ch
	}
	k.subs[ch] = struct{}{}
	// Unsubscribe when ctx ends; AfterFunc starts no goroutine before that.
	context.AfterFunc(ctx, func() { k.unsubscribe(ch) })
	return ch
}

func (k *Broker) unsubscribe(ch chan Event) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if _, ok := k.subs[ch]; ok {
		delete(k.subs, ch)
		close(ch)
	}
}

// Publish delivers ev to every subscription that has room and returns how
// many had none.
func (k *Broker) Publish(ev Event) (dropped int) {
	k.mu.Lock()
	defer k.mu.Unlock()
	for ch := range k.subs {
		select {
		case ch <- ev:
		default:
			dropped++
		}
	}
	return dropped
}

// Close closes every subscription; later ones are closed at once. It is
// idempotent.
func (k *Broker) Close() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.closed = true
	for ch := range k.subs {
		delete(k.subs, ch)
		close(ch)
	}
}
