package message

import (
	"bytes"
	"slices"
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

// FuzzTokenRequest feeds arbitrary bytes to the token request decoder:
// whatever it accepts and validates encodes again to the same request.
func FuzzTokenRequest(f *testing.F) {
	c := NewCodec(4 << 10)
	b, err := c.Append(nil, &TokenRequest{Pod: "web-0", PodUID: "8c4f", Audiences: []string{"https://kubernetes.default.svc"}, ExpirationSeconds: 3607})
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Add([]byte{0x94, 0xa1, 'p', 0xa1, 'u', 0xdd, 0xff, 0xff, 0xff, 0xff, 0x01})
	f.Fuzz(func(t *testing.T, in []byte) {
		var r TokenRequest
		if err := c.UnmarshalValue(in, &r); err != nil || r.Validate() != nil {
			return
		}
		again, err := c.Append(nil, &r)
		if err != nil {
			t.Fatalf("re-encode accepted token request: %v", err)
		}
		var r2 TokenRequest
		if err := c.UnmarshalValue(again, &r2); err != nil || r2.Pod != r.Pod || r2.PodUID != r.PodUID ||
			r2.ExpirationSeconds != r.ExpirationSeconds || !slices.Equal(r2.Audiences, r.Audiences) {
			t.Fatalf("round trip changed the token request: %+v != %+v (%v)", r, r2, err)
		}
	})
}

// FuzzToken feeds arbitrary bytes to the token answer decoder: whatever
// it accepts and validates encodes again to the same answer.
func FuzzToken(f *testing.F) {
	c := NewCodec(32 << 10)
	b, err := c.Append(nil, &Token{Token: "eyJhbGciOiJSUzI1NiJ9.e30.c2ln", ExpiresUnix: 1798761600, ExpirationSeconds: 3607})
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Add([]byte{0x93, 0xa0, 0x00, 0x00})
	f.Fuzz(func(t *testing.T, in []byte) {
		var tok Token
		if err := c.UnmarshalValue(in, &tok); err != nil || tok.Validate() != nil {
			return
		}
		again, err := c.Append(nil, &tok)
		if err != nil {
			t.Fatalf("re-encode accepted token: %v", err)
		}
		var tok2 Token
		if err := c.UnmarshalValue(again, &tok2); err != nil || tok2 != tok {
			t.Fatalf("round trip changed the token: %v != %v (%v)", tok, tok2, err)
		}
	})
}
