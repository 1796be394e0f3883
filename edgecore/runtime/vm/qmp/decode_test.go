package qmp

import (
	"bufio"
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestDecode(t *testing.T) {
	for _, tc := range []struct {
		name, line string
		want       message
		bad        bool
	}{
		{name: "greeting", line: `{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}}, "capabilities": ["oob"]}}`,
			want: message{kind: kindGreeting}},
		{name: "return", line: `{"return": {"status": "running"}, "id": 7}`,
			want: message{kind: kindReturn, id: 7, ret: []byte(`{"status": "running"}`)}},
		{name: "error", line: `{"id": 3, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}`,
			want: message{kind: kindError, id: 3, err: &Error{Class: "CommandNotFound", Desc: "The command nope has not been found"}}},
		{name: "error without id", line: `{"error": {"class": "GenericError", "desc": "JSON parse error"}}`,
			want: message{kind: kindError, err: &Error{Class: "GenericError", Desc: "JSON parse error"}}},
		{name: "event", line: `{"timestamp": {"seconds": 1796127565, "microseconds": 612174}, "event": "SHUTDOWN", "data": {"guest": true}}`,
			want: message{kind: kindEvent, event: Event{Name: "SHUTDOWN", Data: []byte(`{"guest": true}`),
				At: time.Unix(1796127565, 612174000)}}},
		{name: "event bad timestamp", line: `{"timestamp": {"seconds": -1, "microseconds": 5}, "event": "STOP"}`,
			want: message{kind: kindEvent, event: Event{Name: "STOP"}}},
		{name: "empty", line: "", bad: true},
		{name: "not an object", line: `[1,2]`, bad: true},
		{name: "truncated", line: `{"return": {`, bad: true},
		{name: "nothing known", line: `{"foo": 1}`, bad: true},
		{name: "two kinds", line: `{"return": {}, "event": "STOP"}`, bad: true},
		{name: "string id", line: `{"return": {}, "id": "x"}`, bad: true},
		{name: "negative id", line: `{"return": {}, "id": -1}`, bad: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := decode([]byte(tc.line))
			if tc.bad {
				require.ErrorIs(t, err, errMalformed)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.want, m)
		})
	}
}

func TestReadLineBound(t *testing.T) {
	r := bufio.NewReaderSize(strings.NewReader(strings.Repeat("x", maxLine+1)+"\n"), 4096)
	_, err := readLine(r)
	require.ErrorIs(t, err, errMalformed)
	r = bufio.NewReaderSize(strings.NewReader(`{"return": {}}`+"\n"), 16)
	line, err := readLine(r)
	require.NoError(t, err)
	require.Equal(t, `{"return": {}}`+"\n", string(line))
}

// FuzzDecode feeds the reader arbitrary server bytes: it must never panic,
// every accepted message is exactly one kind, and a reply's id is the one
// on the wire.
func FuzzDecode(f *testing.F) {
	for _, s := range []string{
		`{"QMP": {"version": {}, "capabilities": []}}`,
		`{"return": {}, "id": 1}`,
		`{"error": {"class": "GenericError", "desc": "x"}, "id": 2}`,
		`{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r := bufio.NewReaderSize(bytes.NewReader(b), 16)
		for {
			line, err := readLine(r)
			if err != nil {
				return
			}
			m, err := decode(line)
			if err != nil {
				continue
			}
			switch m.kind {
			case kindGreeting:
			case kindReturn:
				if m.ret == nil {
					t.Fatalf("return without a value: %q", line)
				}
			case kindError:
				if m.err == nil {
					t.Fatalf("error without an error: %q", line)
				}
			case kindEvent:
				if m.event.Name == "" {
					t.Fatalf("event without a name: %q", line)
				}
			default:
				t.Fatalf("kind %d for %q", m.kind, line)
			}
		}
	})
}
