package controlplane

import "sync"

// outputTail is how much of etcd's and kube-apiserver's combined output is
// kept to explain a failed start.
const outputTail = 16 << 10

// tailBuffer is an io.Writer that keeps only the last max bytes written to
// it. The processes' output is copied in by os/exec goroutines, so it is
// safe for concurrent use.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	buf []byte
}

func newTailBuffer(max int) *tailBuffer {
	return &tailBuffer{max: max}
}

// Write appends p, dropping the oldest bytes beyond the limit. It never fails.
func (b *tailBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf = append(b.buf, p...)
	if over := len(b.buf) - b.max; over > 0 {
		b.buf = append(b.buf[:0], b.buf[over:]...)
	}
	return len(p), nil
}

// Tail returns the kept output, labelled for an error message.
func (b *tailBuffer) Tail() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.buf) == 0 {
		return "(etcd and kube-apiserver printed nothing)"
	}
	return "last output of etcd and kube-apiserver:\n" + string(b.buf)
}
