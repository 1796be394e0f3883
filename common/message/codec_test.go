package message

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"runtime"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/stretchr/testify/require"
)

func sampleMessage() *Message {
	return &Message{
		ID:   42,
		Kind: KindEvent,
		Node: "edge-1",
		Resource: Resource{
			Version: "v1", Kind: "Pod", Namespace: "default", Name: "web-0",
			UID: "0f6b2b0e-4d58-4c1e-9b7c-0d7a1c1f3e55",
		},
		Version: "123456",
		Op:      OpUpsert,
		ReplyTo: 7,
		Time:    1_700_000_000_000_000_000,
		Payload: []byte(`{"kind":"Pod"}`),
	}
}

func TestRoundTrip(t *testing.T) {
	c := NewCodec(0)
	tests := []struct {
		name string
		msg  *Message
	}{
		{"event", sampleMessage()},
		{"empty payload ack", &Message{ID: 1, Kind: KindAck, ReplyTo: 9}},
		{"cluster scoped", &Message{Kind: KindUpstream, Op: OpStatus, Resource: Resource{Version: "v1", Kind: "Node", Name: "n"}}},
		{"binary payload", &Message{Kind: KindSync, Payload: []byte{0, 1, 2, 0xff, 0xc1}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			body, err := c.Marshal(tt.msg)
			require.NoError(t, err)
			var got Message
			require.NoError(t, c.Unmarshal(body, &got))
			if len(tt.msg.Payload) == 0 {
				got.Payload = tt.msg.Payload
			}
			require.Equal(t, *tt.msg, got)

			frame, err := c.AppendFrame(nil, tt.msg)
			require.NoError(t, err)
			require.Equal(t, uint32(len(body)), binary.BigEndian.Uint32(frame))
			read, err := c.ReadFrame(bytes.NewReader(frame))
			require.NoError(t, err)
			require.Equal(t, body, read)
		})
	}
}

func TestHelloRoundTrip(t *testing.T) {
	c := NewCodec(0)
	b, err := c.Append(nil, &Hello{Version: ProtocolVersion, Node: "edge-1", Agent: "edgecore/dev"})
	require.NoError(t, err)
	var h Hello
	require.NoError(t, c.UnmarshalValue(b, &h))
	require.Equal(t, "edge-1", h.Node)
	require.Equal(t, ProtocolVersion, h.Version)
	require.NoError(t, h.Validate())
	require.ErrorIs(t, (&Hello{}).Validate(), ErrInvalid)
}

func TestValidateRefuses(t *testing.T) {
	long := strings.Repeat("a", 300)
	tests := []struct {
		name string
		mut  func(*Message)
		want string
	}{
		{"unknown kind", func(m *Message) { m.Kind = 200 }, "unknown kind"},
		{"zero kind", func(m *Message) { m.Kind = 0 }, "unknown kind"},
		{"unknown op", func(m *Message) { m.Op = 9 }, "unknown op"},
		{"event without op", func(m *Message) { m.Op = OpNone }, "without op"},
		{"long node", func(m *Message) { m.Node = long }, "node is 300 bytes"},
		{"long name", func(m *Message) { m.Resource.Name = long }, "resource.name"},
		{"long namespace", func(m *Message) { m.Resource.Namespace = long[:64] }, "resource.namespace"},
		{"long version", func(m *Message) { m.Version = long }, "version is 300"},
		{"bad utf8", func(m *Message) { m.Resource.Kind = "\xff\xfe" }, "not valid UTF-8"},
	}
	c := NewCodec(0)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := sampleMessage()
			tt.mut(m)
			body, err := c.Marshal(m)
			require.NoError(t, err)
			var got Message
			err = c.Unmarshal(body, &got)
			require.ErrorIs(t, err, ErrInvalid)
			require.Contains(t, err.Error(), tt.want)
		})
	}
}

func TestReadFrameRefuses(t *testing.T) {
	c := NewCodec(1024)
	header := func(n uint32) []byte {
		b := make([]byte, 4)
		binary.BigEndian.PutUint32(b, n)
		return b
	}
	tests := []struct {
		name  string
		input []byte
		want  error
	}{
		{"clean end", nil, io.EOF},
		{"truncated header", []byte{0, 0}, io.ErrUnexpectedEOF},
		{"zero length", header(0), ErrEmptyFrame},
		{"oversized", header(1025), ErrFrameTooLarge},
		{"huge", header(0xffffffff), ErrFrameTooLarge},
		{"truncated body", append(header(10), 1, 2, 3), io.ErrUnexpectedEOF},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := c.ReadFrame(bytes.NewReader(tt.input))
			require.ErrorIs(t, err, tt.want)
		})
	}
}

func TestMarshalRefusesOversized(t *testing.T) {
	c := NewCodec(100)
	m := sampleMessage()
	m.Payload = make([]byte, 200)
	_, err := c.Marshal(m)
	require.ErrorIs(t, err, ErrFrameTooLarge)
	_, err = c.AppendFrame(nil, m)
	require.ErrorIs(t, err, ErrFrameTooLarge)
	var got Message
	require.ErrorIs(t, c.Unmarshal(make([]byte, 101), &got), ErrFrameTooLarge)
}

func TestUnmarshalGarbage(t *testing.T) {
	c := NewCodec(0)
	for _, in := range [][]byte{
		{0xc1},                         // never-used msgpack byte
		{0x9f},                         // array of 15 with no elements
		{0xdd, 0xff, 0xff, 0xff, 0xff}, // array32 declaring 4G elements
		{0xc6, 0x7f, 0xff, 0xff, 0xff}, // bin32 declaring 2 GiB
		[]byte("GET / HTTP/1.1\r\n\r\n"),
	} {
		var m Message
		err := c.Unmarshal(in, &m)
		require.Error(t, err, "%x", in)
		require.True(t, errors.Is(err, ErrMalformed) || errors.Is(err, ErrInvalid), "%x: %v", in, err)
	}
}

func BenchmarkMarshal256(b *testing.B) {
	c := NewCodec(0)
	m := sampleMessage()
	m.Payload = make([]byte, 256)
	var buf []byte
	b.ReportAllocs()
	for b.Loop() {
		var err error
		buf, err = c.AppendFrame(buf[:0], m)
		if err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkUnmarshal256(b *testing.B) {
	c := NewCodec(0)
	m := sampleMessage()
	m.Payload = make([]byte, 256)
	body, err := c.Marshal(m)
	require.NoError(b, err)
	b.ReportAllocs()
	for b.Loop() {
		var got Message
		if err := c.Unmarshal(body, &got); err != nil {
			b.Fatal(err)
		}
	}
}

// TestCheckLengthsAcceptsEveryType: every msgpack type the encoder writes,
// at every length width, passes the length check, and the check measures
// each value exactly (a body cut by one byte is refused).
func TestCheckLengthsAcceptsEveryType(t *testing.T) {
	type all struct {
		_struct bool `codec:",toarray"` //nolint:unused // tells the codec to encode as an array

		Small, Neg, I8, I16, I32, I64 int64
		U8, U16, U32, U64             uint64
		F32                           float32
		F64                           float64
		B                             bool
		Nil                           []byte
		Strs                          []string
		Bins                          [][]byte
		Map                           map[string]uint16
		Nested                        [][]uint64
	}
	v := all{
		Small: 5, Neg: -3, I8: -100, I16: -3000, I32: -70000, I64: -1 << 40,
		U8: 200, U16: 60000, U32: 1 << 20, U64: 1 << 40, F32: 1.5, F64: 2.25, B: true,
		Strs:   []string{"", "a", strings.Repeat("s", 40), strings.Repeat("m", 300), strings.Repeat("l", 70000)},
		Bins:   [][]byte{{1}, make([]byte, 300), make([]byte, 70000)},
		Map:    map[string]uint16{"a": 1, "b": 2},
		Nested: [][]uint64{make([]uint64, 20), make([]uint64, 70000), nil},
	}
	c := NewCodec(1 << 20)
	body, err := c.Append(nil, &v)
	require.NoError(t, err)
	require.NoError(t, checkLengths(body))
	require.Error(t, checkLengths(body[:len(body)-1]))
	var got all
	require.NoError(t, c.UnmarshalValue(body, &got))
	require.Equal(t, v.Strs, got.Strs)
	require.Equal(t, v.Map, got.Map)
	for _, m := range []*Message{sampleMessage(), {Kind: KindAck}} {
		body, err := c.Marshal(m)
		require.NoError(t, err)
		require.NoError(t, checkLengths(body))
		require.NoError(t, checkLengths(append(body, 0xc1)), "bytes after the value are the decoder's business")
	}
}

func TestCheckLengthsRaw(t *testing.T) {
	ok := [][]byte{
		{0xd4, 0x01, 0xaa},                                     // fixext1
		{0xd8, 0x01, 15: 0, 17: 0},                             // fixext16
		{0xc7, 0x02, 0x05, 0xaa, 0xbb},                         // ext8
		{0xc9, 0, 0, 0, 1, 0x05, 0xaa},                         // ext32
		{0x92, 0xca, 0, 0, 0, 0, 0xd3, 0, 0, 0, 0, 0, 0, 0, 0}, // float32, int64
		{0x81, 0xa1, 'k', 0xc0},                                // fixmap
		{0xde, 0, 1, 0xc0, 0xc0},                               // map16
	}
	for _, b := range ok {
		require.NoError(t, checkLengths(b), "%x", b)
	}
	bad := [][]byte{
		{},
		{0xc1},
		{0xd8, 0x01, 0xaa},             // fixext16 cut short
		{0xc7, 0x02, 0x05, 0xaa},       // ext8 cut short
		{0xde, 0, 1, 0xc0},             // map16 of one pair, one value
		{0x92, 0xc0},                   // array of two, one value
		{0xdc, 0x00},                   // length cut short
		{0x91, 0x91, 0x91, 0x92, 0xc0}, // nested, short by one
	}
	for _, b := range bad {
		require.ErrorIs(t, checkLengths(b), ErrMalformed, "%x", b)
	}
}

// TestReadFrameAllocatesAsBytesArrive: a frame that declares the limit
// and delivers a few bytes costs what arrived, not what it declared; a
// complete large frame is read whole at most twice its size allocated.
func TestReadFrameAllocatesAsBytesArrive(t *testing.T) {
	c := NewCodec(0)
	header := make([]byte, 4)
	binary.BigEndian.PutUint32(header, DefaultMaxFrame)
	cost := func(r io.Reader) (uint64, []byte, error) {
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		body, err := c.ReadFrame(r)
		runtime.ReadMemStats(&after)
		return after.TotalAlloc - before.TotalAlloc, body, err
	}
	n, _, err := cost(bytes.NewReader(append(header, make([]byte, 100)...)))
	require.ErrorIs(t, err, io.ErrUnexpectedEOF)
	require.Less(t, n, uint64(64<<10), "a stalled 4 MiB frame allocated %d bytes", n)

	full := make([]byte, DefaultMaxFrame)
	for i := range full {
		full[i] = byte(i * 7)
	}
	n, body, err := cost(iotest.HalfReader(bytes.NewReader(append(header, full...))))
	require.NoError(t, err)
	require.Equal(t, full, body)
	require.LessOrEqual(t, n, uint64(2*DefaultMaxFrame+(64<<10)))

	for _, size := range []int{1, readChunk - 1, readChunk, readChunk + 1, 3*readChunk + 5} {
		want := bytes.Repeat([]byte{0x5a}, size)
		f := binary.BigEndian.AppendUint32(nil, uint32(size))
		got, err := c.ReadFrame(iotest.OneByteReader(bytes.NewReader(append(f, want...))))
		require.NoError(t, err, "size %d", size)
		require.Equal(t, want, got, "size %d", size)
	}
}
