package message

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/hashicorp/go-msgpack/v2/codec"
)

// Sentinel errors of the codec. Decoding errors wrap one of them.
var (
	// ErrFrameTooLarge means a frame's length exceeds the configured limit.
	ErrFrameTooLarge = errors.New("message: frame too large")
	// ErrEmptyFrame means a frame declared a zero length.
	ErrEmptyFrame = errors.New("message: empty frame")
	// ErrMalformed means the body is not a valid msgpack encoding of the
	// expected type.
	ErrMalformed = errors.New("message: malformed body")
)

// frameHeaderLen is the size of the length prefix on byte streams.
const frameHeaderLen = 4

// Codec encodes and decodes envelopes and payload structs with msgpack and
// enforces the frame size limit. It is safe for concurrent use.
type Codec struct {
	handle   *codec.MsgpackHandle
	maxFrame int
	encoders sync.Pool
	decoders sync.Pool
}

// NewCodec returns a codec that refuses frames larger than maxFrame bytes.
// Zero means DefaultMaxFrame.
func NewCodec(maxFrame int) *Codec {
	if maxFrame <= 0 {
		maxFrame = DefaultMaxFrame
	}
	h := &codec.MsgpackHandle{WriteExt: true}
	h.RawToString = false
	// MaxInitLen caps a collection's first allocation in elements, not
	// bytes, so it does not bound memory by itself: checkLengths does, by
	// refusing any declared length that the bytes left cannot hold before
	// the decoder sees the body. With every length so bounded, a cap of one
	// frame never binds, and large honest collections are allocated once at
	// their size (a smaller cap makes the codec grow them in steps of the
	// cap, quadratically for byte strings).
	h.MaxInitLen = maxFrame
	c := &Codec{handle: h, maxFrame: maxFrame}
	c.encoders.New = func() any { return codec.NewEncoderBytes(nil, h) }
	c.decoders.New = func() any { return codec.NewDecoderBytes(nil, h) }
	return c
}

// MaxFrame returns the frame size limit in bytes.
func (c *Codec) MaxFrame() int { return c.maxFrame }

// Append encodes v (a *Message or a payload struct) and appends it to dst.
func (c *Codec) Append(dst []byte, v any) ([]byte, error) {
	enc := c.encoders.Get().(*codec.Encoder)
	defer c.encoders.Put(enc)
	// The encoder writes from the start of the slice it is given, so hand
	// it the unused capacity behind dst and append what it wrote (a copy
	// onto itself when it did not have to grow).
	out := dst[len(dst):]
	if out == nil {
		out = make([]byte, 0, 512)
	}
	enc.ResetBytes(&out)
	if err := enc.Encode(v); err != nil {
		return nil, fmt.Errorf("encode %T: %w", v, err)
	}
	return append(dst, out...), nil
}

// Marshal encodes a message body and checks it against the frame limit.
func (c *Codec) Marshal(m *Message) ([]byte, error) {
	b, err := c.Append(nil, m)
	if err != nil {
		return nil, err
	}
	if len(b) > c.maxFrame {
		return nil, fmt.Errorf("%w: %d bytes, limit %d", ErrFrameTooLarge, len(b), c.maxFrame)
	}
	return b, nil
}

// AppendFrame appends the length-prefixed frame of m to dst.
func (c *Codec) AppendFrame(dst []byte, m *Message) ([]byte, error) {
	start := len(dst)
	dst = append(dst, 0, 0, 0, 0)
	dst, err := c.Append(dst, m)
	if err != nil {
		return nil, err
	}
	n := len(dst) - start - frameHeaderLen
	if n > c.maxFrame {
		return nil, fmt.Errorf("%w: %d bytes, limit %d", ErrFrameTooLarge, n, c.maxFrame)
	}
	binary.BigEndian.PutUint32(dst[start:], uint32(n))
	return dst, nil
}

// Unmarshal decodes a message body into m and validates it. The body must
// not be longer than the frame limit.
func (c *Codec) Unmarshal(body []byte, m *Message) error {
	if err := c.decode(body, m); err != nil {
		return err
	}
	return m.Validate()
}

// UnmarshalValue decodes a payload struct such as a Hello from body.
func (c *Codec) UnmarshalValue(body []byte, v any) error {
	return c.decode(body, v)
}

func (c *Codec) decode(body []byte, v any) (err error) {
	if len(body) == 0 {
		return ErrEmptyFrame
	}
	if len(body) > c.maxFrame {
		return fmt.Errorf("%w: %d bytes, limit %d", ErrFrameTooLarge, len(body), c.maxFrame)
	}
	if err := checkLengths(body); err != nil {
		return fmt.Errorf("decode %T: %w", v, err)
	}
	dec := c.decoders.Get().(*codec.Decoder)
	defer c.decoders.Put(dec)
	dec.ResetBytes(body)
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: %T: %v", ErrMalformed, v, err) //nolint:errorlint // codec errors are opaque text; ErrMalformed is the contract
	}
	return nil
}

// ReadFrame reads one length-prefixed frame body from r. It checks the
// declared length against the limit before allocating, allocates as the
// body's bytes arrive rather than at the declared length (a peer that
// declares MaxFrame and sends nothing pins readChunk bytes, not MaxFrame),
// and returns io.EOF only when r ends cleanly between frames.
func (c *Codec) ReadFrame(r io.Reader) ([]byte, error) {
	var hdr [frameHeaderLen]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, fmt.Errorf("read frame header: truncated: %w", err)
		}
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n == 0 {
		return nil, ErrEmptyFrame
	}
	if uint64(n) > uint64(c.maxFrame) {
		return nil, fmt.Errorf("%w: declared %d bytes, limit %d", ErrFrameTooLarge, n, c.maxFrame)
	}
	body, err := readBody(r, int(n))
	if err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("read frame body of %d bytes: truncated: %w", n, err)
	}
	return body, nil
}

// readChunk is the most ReadFrame allocates for a body before its bytes
// arrive; smaller bodies are allocated at their size.
const readChunk = 16 << 10

// readBody reads exactly n bytes from r into a buffer that starts at
// readChunk and doubles as it fills, up to n: a body of n bytes costs at
// most 2n allocated and n copied, and a stalled sender costs what it sent.
func readBody(r io.Reader, n int) ([]byte, error) {
	if n <= readChunk {
		body := make([]byte, n)
		_, err := io.ReadFull(r, body)
		return body, err
	}
	body := make([]byte, 0, readChunk)
	for len(body) < n {
		if len(body) == cap(body) {
			grown := make([]byte, len(body), min(2*cap(body), n))
			copy(grown, body)
			body = grown
		}
		m, err := r.Read(body[len(body):cap(body)])
		body = body[:len(body)+m]
		if err != nil && len(body) < n {
			return nil, err
		}
	}
	return body, nil
}
