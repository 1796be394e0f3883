package tunnel

import (
	"context"
	"sync"
)

// group runs the goroutines of one session, like an errgroup, without a
// goroutine of its own waiting for them: the first error returned cancels
// the session with it as the cause, and the last member to exit calls
// done, once. An idle session thus holds only the goroutines that block
// on its transport, not one more to watch them.
//
// A member may start more members (the lazy writer, a large-message
// reader). Once the count has reached zero the group is over and Go
// starts nothing: the session has ended, and whatever wanted to run has
// nothing left to act on.
type group struct {
	cancel context.CancelCauseFunc
	done   func()

	mu   sync.Mutex
	n    int
	over bool
}

func newGroup(cancel context.CancelCauseFunc, done func()) *group {
	return &group{cancel: cancel, done: done}
}

// Go runs f as a member, unless the group is over.
func (g *group) Go(f func() error) { g.tryGo(f) }

// tryGo runs f as a member and reports whether it did.
func (g *group) tryGo(f func() error) bool {
	if !g.add() {
		return false
	}
	go func() { // joined: the last member to exit calls done
		defer g.exit()
		if err := f(); err != nil {
			g.cancel(err)
		}
	}()
	return true
}

// add counts a member that runs on its own (a context.AfterFunc), which
// must call exit when it ends.
func (g *group) add() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.over {
		return false
	}
	g.n++
	return true
}

func (g *group) exit() {
	g.mu.Lock()
	g.n--
	last := g.n == 0
	if last {
		g.over = true
	}
	g.mu.Unlock()
	if last {
		g.done()
	}
}

// spawner is what a link gets to start goroutines the session joins.
type spawner interface {
	Go(f func() error)
}
