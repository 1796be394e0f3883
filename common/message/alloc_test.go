package message_test

import (
	"bytes"
	"runtime"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
)

// allocFactor and allocSlack bound what decoding N bytes may allocate:
// allocFactor*N + allocSlack. The factor is the largest element this
// codebase decodes (an objsync.Entry, 24 bytes) that a 1-byte msgpack
// value (nil, or an empty array) can fill, rounded up; the slack covers the
// decoder's fixed cost and the runtime's size classes.
const (
	allocFactor = 32
	allocSlack  = 16 << 10
)

// decodeCost returns the bytes allocated while decoding body into v, and
// the decode error. It must run on one goroutine with nothing else
// allocating, so the difference in TotalAlloc is the decode's.
func decodeCost(c *message.Codec, body []byte, v any) (uint64, error) {
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	err := c.UnmarshalValue(body, v)
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc, err
}

// wide has the shapes whose element size multiplies a declared length:
// integers, structs, strings, bytes.
type wide struct {
	_struct bool `codec:",toarray"` //nolint:unused // tells the codec to encode as an array

	Ints    []uint64
	Pairs   []objsync.Entry
	Strings []string
	Blobs   [][]byte
}

// targets returns fresh values of every payload type decoded from the
// network.
func targets() []any {
	return []any{new(message.Message), new(objsync.Sync), new(message.Hello), new(message.Retry), new(wide)}
}

// hostileBodies declare collections far larger than the bytes behind them.
var hostileBodies = map[string][]byte{
	// Sync{Phase: 3, Count: 0, Buckets: nil, Entries: array32 of 4Mi-1}:
	// nine bytes that made the decoder allocate 96 MiB.
	"sync entries of 4Mi": {0x94, 0x03, 0x00, 0xc0, 0xdd, 0x00, 0x3f, 0xff, 0xff},
	"sync buckets of 4Gi": {0x93, 0x01, 0x00, 0xdd, 0xff, 0xff, 0xff, 0xff},
	"array32 of 4Gi":      {0xdd, 0xff, 0xff, 0xff, 0xff},
	"map32 of 4Gi":        {0xdf, 0xff, 0xff, 0xff, 0xff},
	"bin32 of 2Gi":        {0xc6, 0x7f, 0xff, 0xff, 0xff},
	"str32 of 4Gi":        {0xdb, 0xff, 0xff, 0xff, 0xff},
	"ext32 of 4Gi":        {0xc9, 0xff, 0xff, 0xff, 0xff, 0x01},
	"wide ints of 1Mi":    {0x91, 0xdd, 0x00, 0x10, 0x00, 0x00, 0x01, 0x02},
	"wide strings of 1Mi": {0x93, 0xc0, 0xc0, 0xdd, 0x00, 0x10, 0x00, 0x00, 0xa1, 'x'},
	"empty pairs of 16Ki": {0x92, 0xc0, 0xdc, 0x40, 0x00},
	"nested blobs":        {0x94, 0xc0, 0xc0, 0xc0, 0x92, 0xc6, 0x00, 0x10, 0x00, 0x00, 0xc6, 0x00, 0x10, 0x00, 0x00},
}

// legitBodies are valid encodings, some large, that must decode in one
// allocation per collection rather than growing step by step.
func legitBodies(t testing.TB) map[string][]byte {
	c := message.NewCodec(0)
	enc := func(v any) []byte {
		b, err := c.Append(nil, v)
		require.NoError(t, err)
		return b
	}
	entries := make([]objsync.Entry, objsync.MaxEntries)
	for i := range entries {
		entries[i] = objsync.Entry{Key: uint64(i) * 0x9e3779b97f4a7c15, Version: uint64(i)}
	}
	msg := &message.Message{ID: 9, Kind: message.KindEvent, Op: message.OpUpsert, Node: "edge-1", Payload: bytes.Repeat([]byte{7}, 3<<20)}
	return map[string][]byte{
		"list of MaxEntries": enc(&objsync.Sync{Phase: objsync.PhaseList, Entries: entries}),
		"digest":             enc(&objsync.Sync{Phase: objsync.PhaseDigest, Count: 5, Buckets: make([]uint64, objsync.MaxBuckets)}),
		"3 MiB event":        enc(msg),
		"many small ints":    enc(&wide{Ints: make([]uint64, 1<<18)}),
	}
}

// TestDecodeAllocationIsBoundedByInput: no body of N bytes makes the
// decoder allocate more than allocFactor*N + allocSlack, whatever lengths
// it declares, and legitimate large payloads cost about their decoded size.
func TestDecodeAllocationIsBoundedByInput(t *testing.T) {
	c := message.NewCodec(0)
	warm(t, c)
	check := func(t *testing.T, body []byte) {
		for _, v := range targets() {
			cost, err := decodeCost(c, body, v)
			limit := uint64(allocFactor*len(body) + allocSlack)
			require.LessOrEqual(t, cost, limit, "decoding %d bytes into %T allocated %d bytes (err %v)", len(body), v, cost, err)
		}
	}
	for name, body := range hostileBodies {
		t.Run(name, func(t *testing.T) { check(t, body) })
	}
	for name, body := range legitBodies(t) {
		t.Run(name, func(t *testing.T) { check(t, body) })
	}
	t.Run("many empty pairs padded", func(t *testing.T) {
		// 16384 entries of one byte each: the worst legitimate ratio.
		body := append([]byte{0x94, 0x03, 0x00, 0xc0, 0xdc, 0x40, 0x00}, bytes.Repeat([]byte{0xc0}, 1<<14)...)
		var s objsync.Sync
		cost, err := decodeCost(c, body, &s)
		require.NoError(t, err)
		require.Len(t, s.Entries, 1<<14)
		require.LessOrEqual(t, cost, uint64(allocFactor*len(body)+allocSlack))
	})
	t.Run("large list decodes in one allocation", func(t *testing.T) {
		body := legitBodies(t)["list of MaxEntries"]
		var s objsync.Sync
		cost, err := decodeCost(c, body, &s)
		require.NoError(t, err)
		require.Len(t, s.Entries, objsync.MaxEntries)
		// The entries themselves take 24 bytes each; growing them by
		// steps would allocate about twice that.
		require.Less(t, cost, uint64(objsync.MaxEntries*24*5/4), "a large list grew in steps")
	})
}

// warm decodes each type once so that the codec's per-type caches are not
// counted against the first measured decode.
func warm(t testing.TB, c *message.Codec) {
	for _, v := range targets() {
		_ = c.UnmarshalValue([]byte{0x90}, v)
	}
	for _, body := range legitBodies(t) {
		for _, v := range targets() {
			_ = c.UnmarshalValue(body, v)
		}
	}
}

// FuzzDecodeAllocation checks the same bound on arbitrary bodies, for
// every payload type decoded from the network.
func FuzzDecodeAllocation(f *testing.F) {
	c := message.NewCodec(0)
	warm(f, c)
	for _, body := range hostileBodies {
		f.Add(body)
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		for _, v := range targets() {
			cost, err := decodeCost(c, body, v)
			if limit := uint64(allocFactor*len(body) + allocSlack); cost > limit {
				t.Fatalf("decoding %d bytes into %T allocated %d bytes, limit %d (err %v)", len(body), v, cost, limit, err)
			}
		}
	})
}
