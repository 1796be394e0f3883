package message

import (
	"bytes"
	"testing"
)

// FuzzUnmarshal feeds arbitrary bodies to the envelope decoder: it must never
// panic, and whatever it accepts must encode again and decode to the same.
func FuzzUnmarshal(f *testing.F) {
	c := NewCodec(64 << 10)
	body, err := c.Marshal(sampleMessage())
	if err != nil {
		f.Fatal(err)
	}
	f.Add(body)
	f.Add([]byte{0x90})
	f.Add([]byte{0xdd, 0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, in []byte) {
		var m Message
		if err := c.Unmarshal(in, &m); err != nil {
			return
		}
		again, err := c.Marshal(&m)
		if err != nil {
			t.Fatalf("re-encode accepted message: %v", err)
		}
		var m2 Message
		if err := c.Unmarshal(again, &m2); err != nil {
			t.Fatalf("decode re-encoded message: %v", err)
		}
		if m.ID != m2.ID || m.Kind != m2.Kind || m.Resource != m2.Resource || !bytes.Equal(m.Payload, m2.Payload) {
			t.Fatalf("round trip changed the message: %+v != %+v", m, m2)
		}
	})
}

// FuzzHello feeds arbitrary bytes to the hello decoder.
func FuzzHello(f *testing.F) {
	c := NewCodec(4 << 10)
	b, err := c.Append(nil, &Hello{Version: ProtocolVersion, Node: "edge-1", Agent: "x"})
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Fuzz(func(_ *testing.T, in []byte) {
		var h Hello
		if err := c.UnmarshalValue(in, &h); err == nil {
			_ = h.Validate()
		}
	})
}

// FuzzReadFrame feeds arbitrary byte streams to the frame reader.
func FuzzReadFrame(f *testing.F) {
	c := NewCodec(4 << 10)
	frame, err := c.AppendFrame(nil, sampleMessage())
	if err != nil {
		f.Fatal(err)
	}
	f.Add(frame)
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Add([]byte{0, 0, 0, 3, 1})
	f.Fuzz(func(t *testing.T, in []byte) {
		r := bytes.NewReader(in)
		for {
			body, err := c.ReadFrame(r)
			if err != nil {
				return
			}
			if len(body) == 0 || len(body) > c.MaxFrame() {
				t.Fatalf("ReadFrame returned %d bytes", len(body))
			}
		}
	})
}

// FuzzGoodbye feeds arbitrary bytes to the goodbye decoder: whatever it
// accepts and validates encodes again to the same goodbye.
func FuzzGoodbye(f *testing.F) {
	c := NewCodec(4 << 10)
	b, err := c.Append(nil, &Goodbye{Reason: "rebalance", Hint: "quic://10.0.0.2:10000"})
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Add([]byte{0x92, 0xa0, 0xa0})
	f.Fuzz(func(t *testing.T, in []byte) {
		var g Goodbye
		if err := c.UnmarshalValue(in, &g); err != nil || g.Validate() != nil {
			return
		}
		again, err := c.Append(nil, &g)
		if err != nil {
			t.Fatalf("re-encode accepted goodbye: %v", err)
		}
		var g2 Goodbye
		if err := c.UnmarshalValue(again, &g2); err != nil || g2 != g {
			t.Fatalf("round trip changed the goodbye: %+v != %+v (%v)", g, g2, err)
		}
	})
}
