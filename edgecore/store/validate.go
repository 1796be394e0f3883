package store

import (
	"encoding/json"
	"fmt"
	"strings"
	"unicode/utf8"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
)

// MaxDataLen bounds the data of one object or outbox item. It is a sanity
// bound well above Kubernetes' own object size limit (etcd's 1.5 MiB
// request limit) and the protocol's default frame size.
const MaxDataLen = 8 << 20

// Field limits. They are the same as the protocol's (common/message):
// Kubernetes DNS subdomain names of 253 bytes and labels of 63, with room
// for UIDs and resource versions.
const (
	maxGroupLen      = 253
	maxAPIVersionLen = 63
	maxKindLen       = 63
	maxNamespaceLen  = 63
	maxNameLen       = 253
	maxUIDLen        = 128
	maxVersionLen    = 128
)

// validateResource checks a resource's identity fields: kind and name set,
// every field bounded and valid UTF-8, and no '/' or NUL in the parts of
// the key. Kubernetes never allows '/' there; it must be refused because
// the key's string form joins the parts with '/', so {namespace "a/b", name
// "c"} and {namespace "a", name "b/c"} would be stored as one object.
func validateResource(r message.Resource) error {
	fields := [...]struct {
		name     string
		value    string
		max      int
		keyPart  bool
		required bool
	}{
		{"group", r.Group, maxGroupLen, true, false},
		{"api version", r.Version, maxAPIVersionLen, false, false},
		{"kind", r.Kind, maxKindLen, true, true},
		{"namespace", r.Namespace, maxNamespaceLen, true, false},
		{"name", r.Name, maxNameLen, true, true},
		{"uid", r.UID, maxUIDLen, false, false},
	}
	for _, f := range fields {
		if err := checkString(f.name, f.value, f.max); err != nil {
			return err
		}
		if f.required && f.value == "" {
			return fmt.Errorf("%w: %s is empty", ErrInvalid, f.name)
		}
		if f.keyPart && strings.ContainsAny(f.value, "/\x00") {
			return fmt.Errorf("%w: %s contains '/' or NUL", ErrInvalid, f.name)
		}
	}
	return nil
}

func checkString(field, value string, maxLen int) error {
	if len(value) > maxLen {
		return fmt.Errorf("%w: %s is %d bytes, limit %d", ErrInvalid, field, len(value), maxLen)
	}
	if !utf8.ValidString(value) {
		return fmt.Errorf("%w: %s is not valid UTF-8", ErrInvalid, field)
	}
	return nil
}

// validateChange checks one change of a batch before anything is written.
func validateChange(c *Change) error {
	if c.Op != message.OpUpsert && c.Op != message.OpDelete {
		return fmt.Errorf("%w: op %s (%d), want upsert or delete", ErrInvalid, c.Op, uint8(c.Op))
	}
	if err := validateResource(c.Object.Resource); err != nil {
		return err
	}
	if c.Op == message.OpDelete {
		return nil // only the key matters
	}
	if err := checkString("resource version", c.Object.Version, maxVersionLen); err != nil {
		return err
	}
	return checkObjectData(c.Object.Data)
}

// checkObjectData checks an object's data: bounded, non-empty JSON.
func checkObjectData(data []byte) error {
	if err := checkData(data); err != nil {
		return err
	}
	if !json.Valid(data) {
		return fmt.Errorf("%w: data is not valid JSON", ErrInvalid)
	}
	return nil
}

func checkData(data []byte) error {
	if len(data) == 0 {
		return fmt.Errorf("%w: data is empty", ErrInvalid)
	}
	if len(data) > MaxDataLen {
		return fmt.Errorf("%w: data is %d bytes, limit %d", ErrInvalid, len(data), MaxDataLen)
	}
	return nil
}

// describe names a change in an error: its op and key, quoted and cut short
// so that a hostile key cannot flood a log line.
func describe(op message.Op, r message.Resource) string {
	const maxLen = 120
	k := objsync.KeyOf(r).String()
	if len(k) > maxLen {
		k = k[:maxLen] + "..."
	}
	return fmt.Sprintf("%s %q", op, k)
}
