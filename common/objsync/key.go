// Package objsync is the part of the sync protocol that both sides share:
// object keys, the hashes that identify an object's key and version
// compactly, the bucketed inventory digest an edge sends up on reconnect,
// and the payloads of sync messages. It does no I/O and knows nothing of
// Kubernetes clients or SQLite.
package objsync

import (
	"hash/fnv"
	"strings"

	"github.com/tetheredge/tether/common/message"
)

// Key names one object independently of its version: API group, kind,
// namespace and name. Two objects with the same key are the same object
// (a deleted and recreated object has the same key and a new version).
type Key struct {
	Group     string
	Kind      string
	Namespace string
	Name      string
}

// KeyOf returns the key of a message resource.
func KeyOf(r message.Resource) Key {
	return Key{Group: r.Group, Kind: r.Kind, Namespace: r.Namespace, Name: r.Name}
}

// String returns "group/Kind/namespace/name" (empty parts kept), the form
// stored at the edge and hashed by Hash.
func (k Key) String() string {
	var b strings.Builder
	b.Grow(len(k.Group) + len(k.Kind) + len(k.Namespace) + len(k.Name) + 3)
	b.WriteString(k.Group)
	b.WriteByte('/')
	b.WriteString(k.Kind)
	b.WriteByte('/')
	b.WriteString(k.Namespace)
	b.WriteByte('/')
	b.WriteString(k.Name)
	return b.String()
}

// Hash is the 64-bit FNV-1a hash of String. It identifies the object in
// inventories; 64 bits make a collision among one node's objects
// vanishingly unlikely (about 3e-12 for 10,000 objects).
func (k Key) Hash() uint64 {
	h := fnv.New64a()
	_, _ = h.Write([]byte(k.String()))
	return h.Sum64()
}

// VersionHash is the 64-bit FNV-1a hash of an object's uid and version. The
// version is opaque: it is only ever compared for equality, through this
// hash. The uid is included so that a recreated object never matches.
func VersionHash(uid, version string) uint64 {
	h := fnv.New64a()
	_, _ = h.Write([]byte(uid))
	_, _ = h.Write([]byte{0})
	_, _ = h.Write([]byte(version))
	return h.Sum64()
}

// Entry is one object of an inventory: which object, at which version.
type Entry struct {
	_struct bool `codec:",toarray"` //nolint:unused // tells the codec to encode as an array

	Key     uint64
	Version uint64
}
