package qmp

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"
)

// The wire protocol (QEMU's docs/interop/qmp-spec.rst), as this client
// uses it. Every message is one JSON object on its own line, UTF-8, ending
// in "\n" (QEMU pretty-prints nothing on a socket unless pretty=on, which
// this client never asks for).
//
//	server greeting  {"QMP": {"version": {...}, "capabilities": [...]}}
//	client command   {"execute": "NAME", "arguments": {...}, "id": N}
//	success reply    {"return": VALUE, "id": N}
//	error reply      {"error": {"class": "GenericError", "desc": "..."}, "id": N}
//	event            {"event": "NAME", "data": {...}, "timestamp": {"seconds": S, "microseconds": U}}
//
// Flow: connect, read the greeting, execute qmp_capabilities (nothing but
// that command is accepted before it), then commands and events
// interleave. Without out-of-band execution (never enabled here) QEMU
// answers commands in the order it read them; the id still matches each
// reply to its command, so a reply that comes after its command gave up is
// recognised and dropped instead of answering the next command.

// maxLine bounds one message. QEMU's largest replies (query-qmp-schema)
// are about 200 KiB; nothing this client asks for comes close.
const maxLine = 1 << 20

// kind is what a line from the server is.
type kind int

const (
	kindGreeting kind = iota + 1
	kindReturn
	kindError
	kindEvent
)

// message is one decoded server line.
type message struct {
	kind  kind
	id    uint64          // kindReturn, kindError: the command id
	ret   json.RawMessage // kindReturn
	err   *Error          // kindError
	event Event           // kindEvent
}

// wireMessage is the union of every server message's fields.
type wireMessage struct {
	QMP       json.RawMessage `json:"QMP"`
	Return    json.RawMessage `json:"return"`
	Error     *Error          `json:"error"`
	ID        json.RawMessage `json:"id"`
	Event     string          `json:"event"`
	Data      json.RawMessage `json:"data"`
	Timestamp *struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
}

// errMalformed marks a line that is not a QMP message.
var errMalformed = errors.New("qmp: malformed message")

// decode parses one line from the server. It never panics and bounds
// nothing itself (the reader bounds the line); a line that is not exactly
// one of the four message kinds is an error wrapping errMalformed.
func decode(line []byte) (message, error) {
	line = bytes.TrimSpace(line)
	if len(line) == 0 || line[0] != '{' {
		return message{}, fmt.Errorf("decode %q: %w: not a JSON object", clip(line), errMalformed)
	}
	var w wireMessage
	if err := json.Unmarshal(line, &w); err != nil {
		return message{}, fmt.Errorf("decode %q: %w: %v", clip(line), errMalformed, err) //nolint:errorlint // one %w: the sentinel
	}
	n := 0
	for _, present := range []bool{w.QMP != nil, w.Return != nil, w.Error != nil, w.Event != ""} {
		if present {
			n++
		}
	}
	if n != 1 {
		return message{}, fmt.Errorf("decode %q: %w: want exactly one of QMP, return, error, event", clip(line), errMalformed)
	}
	switch {
	case w.QMP != nil:
		return message{kind: kindGreeting}, nil
	case w.Event != "":
		ev := Event{Name: w.Event, Data: w.Data}
		if w.Timestamp != nil && w.Timestamp.Seconds >= 0 && w.Timestamp.Microseconds >= 0 && w.Timestamp.Microseconds < 1e6 {
			ev.At = time.Unix(w.Timestamp.Seconds, w.Timestamp.Microseconds*1000)
		}
		return message{kind: kindEvent, event: ev}, nil
	}
	id, err := parseID(w.ID)
	if err != nil {
		return message{}, fmt.Errorf("decode %q: %w", clip(line), err)
	}
	if w.Error != nil {
		return message{kind: kindError, id: id, err: w.Error}, nil
	}
	return message{kind: kindReturn, id: id, ret: w.Return}, nil
}

// parseID reads the id this client sent: a non-negative integer. A reply
// without an id is one QEMU could not attribute (a command it could not
// parse); it gets id 0, which no command uses.
func parseID(raw json.RawMessage) (uint64, error) {
	if raw == nil || string(raw) == "null" {
		return 0, nil
	}
	id, err := strconv.ParseUint(string(raw), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%w: id %s is not a command id of this client", errMalformed, clip(raw))
	}
	return id, nil
}

// clip shortens a line for an error message.
func clip(b []byte) string {
	const n = 120
	if len(b) <= n {
		return string(b)
	}
	return string(b[:n]) + "..."
}
