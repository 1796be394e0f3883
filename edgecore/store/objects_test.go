package store

import (
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
)

func configMap(namespace, name, resourceVersion string) Object {
	return Object{
		Resource: message.Resource{
			Version:   "v1",
			Kind:      "ConfigMap",
			Namespace: namespace,
			Name:      name,
			UID:       "uid-" + namespace + "-" + name,
		},
		Version: resourceVersion,
		Data:    fmt.Appendf(nil, `{"metadata":{"name":%q,"namespace":%q,"resourceVersion":%q}}`, name, namespace, resourceVersion),
	}
}

func nodeObject(name, resourceVersion string) Object {
	return Object{
		Resource: nodeResource(name),
		Version:  resourceVersion,
		Data:     fmt.Appendf(nil, `{"metadata":{"name":%q}}`, name),
	}
}

func nodeResource(name string) message.Resource {
	return message.Resource{Version: "v1", Kind: "Node", Name: name, UID: "uid-" + name}
}

func upsert(o Object) Change { return Change{Op: message.OpUpsert, Object: o} }

// del returns a delete carrying only the key fields, as the cloud sends it.
func del(o Object) Change {
	r := o.Resource
	return Change{Op: message.OpDelete, Object: Object{Resource: message.Resource{
		Group: r.Group, Kind: r.Kind, Namespace: r.Namespace, Name: r.Name,
	}}}
}

func entryOf(o Object) objsync.Entry {
	return objsync.Entry{Key: o.Key().Hash(), Version: objsync.VersionHash(o.Resource.UID, o.Version)}
}

// sortedEntries is the inventory of objs in the store's order.
func sortedEntries(objs ...Object) []objsync.Entry {
	out := make([]objsync.Entry, 0, len(objs))
	for _, o := range objs {
		out = append(out, entryOf(o))
	}
	slices.SortFunc(out, func(a, b objsync.Entry) int {
		// The store orders by the signed column value.
		return cmpInt(int64(a.Key), int64(b.Key))
	})
	return out
}

func cmpInt(a, b int64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func TestApply(t *testing.T) {
	a1, a2 := configMap("default", "a", "1"), configMap("default", "a", "2")
	b1 := configMap("default", "b", "1")
	c1 := configMap("kube-system", "c", "1")
	n1 := nodeObject("node-1", "7")
	recreated := a2
	recreated.Resource.UID = "new-uid"

	tests := []struct {
		name    string
		batches [][]Change
		want    []Object // exactly the stored objects
	}{
		{name: "empty batch", batches: [][]Change{{}}},
		{name: "upserts", batches: [][]Change{{upsert(a1), upsert(b1), upsert(n1)}}, want: []Object{a1, b1, n1}},
		{name: "upsert replaces", batches: [][]Change{{upsert(a1)}, {upsert(a2)}}, want: []Object{a2}},
		{name: "later change in a batch wins", batches: [][]Change{{upsert(a1), upsert(a2)}}, want: []Object{a2}},
		{name: "recreated object replaces", batches: [][]Change{{upsert(a1)}, {upsert(recreated)}}, want: []Object{recreated}},
		{name: "delete", batches: [][]Change{{upsert(a1), upsert(b1)}, {del(a1)}}, want: []Object{b1}},
		{name: "delete then upsert in one batch", batches: [][]Change{{upsert(a1)}, {del(a1), upsert(a2)}}, want: []Object{a2}},
		{name: "upsert then delete in one batch", batches: [][]Change{{upsert(a1), del(a1)}}},
		{name: "delete of missing key is a no-op", batches: [][]Change{{del(c1)}, {upsert(a1), del(b1)}}, want: []Object{a1}},
		{name: "duplicate batch is harmless", batches: [][]Change{{upsert(a1), del(b1)}, {upsert(a1), del(b1)}}, want: []Object{a1}},
		{name: "cluster scoped and namespaced", batches: [][]Change{{upsert(n1), upsert(c1)}}, want: []Object{n1, c1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := t.Context()
			s := openStore(t, filepath.Join(t.TempDir(), "edge.db"))
			for _, b := range tt.batches {
				require.NoError(t, s.Apply(ctx, b))
			}

			n, err := s.Count(ctx)
			require.NoError(t, err)
			require.Equal(t, len(tt.want), n)
			for _, o := range tt.want {
				got, ok, err := s.Get(ctx, o.Key())
				require.NoError(t, err)
				require.True(t, ok, "%s", o.Key())
				require.Equal(t, o, got)
			}
			for _, o := range []Object{a1, b1, c1, n1} {
				if slices.ContainsFunc(tt.want, func(w Object) bool { return w.Key() == o.Key() }) {
					continue
				}
				_, ok, err := s.Get(ctx, o.Key())
				require.NoError(t, err)
				require.False(t, ok, "%s must be absent", o.Key())
			}
			inv, err := s.Inventory(ctx)
			require.NoError(t, err)
			if len(tt.want) == 0 {
				require.Empty(t, inv)
			} else {
				require.Equal(t, sortedEntries(tt.want...), inv)
			}
		})
	}
}

func TestApplyValidation(t *testing.T) {
	good := configMap("default", "good", "1")
	with := func(f func(c *Change)) Change {
		c := upsert(configMap("default", "bad", "1"))
		f(&c)
		return c
	}
	long := func(n int) string { return strings.Repeat("x", n) }

	tests := []struct {
		name    string
		change  Change
		wantMsg string
	}{
		{"op none", with(func(c *Change) { c.Op = message.OpNone }), "op"},
		{"op status", with(func(c *Change) { c.Op = message.OpStatus }), "want upsert or delete"},
		{"unknown op", with(func(c *Change) { c.Op = 200 }), "op"},
		{"empty kind", with(func(c *Change) { c.Object.Resource.Kind = "" }), "kind is empty"},
		{"empty name", with(func(c *Change) { c.Object.Resource.Name = "" }), "name is empty"},
		{"delete with empty name", Change{Op: message.OpDelete, Object: Object{Resource: message.Resource{Kind: "ConfigMap"}}}, "name is empty"},
		{"empty data", with(func(c *Change) { c.Object.Data = nil }), "data is empty"},
		{"data not JSON", with(func(c *Change) { c.Object.Data = []byte(`{"a":`) }), "not valid JSON"},
		{"data too large", with(func(c *Change) { c.Object.Data = make([]byte, MaxDataLen+1) }), "limit"},
		{"name too long", with(func(c *Change) { c.Object.Resource.Name = long(254) }), "name is 254 bytes"},
		{"namespace too long", with(func(c *Change) { c.Object.Resource.Namespace = long(64) }), "namespace is 64 bytes"},
		{"kind too long", with(func(c *Change) { c.Object.Resource.Kind = long(64) }), "kind is 64 bytes"},
		{"group too long", with(func(c *Change) { c.Object.Resource.Group = long(254) }), "group is 254 bytes"},
		{"api version too long", with(func(c *Change) { c.Object.Resource.Version = long(64) }), "api version"},
		{"uid too long", with(func(c *Change) { c.Object.Resource.UID = long(129) }), "uid"},
		{"resource version too long", with(func(c *Change) { c.Object.Version = long(129) }), "resource version"},
		{"name not UTF-8", with(func(c *Change) { c.Object.Resource.Name = "a\xffb" }), "UTF-8"},
		{"slash in name", with(func(c *Change) { c.Object.Resource.Name = "a/b" }), "'/'"},
		{"slash in namespace", with(func(c *Change) { c.Object.Resource.Namespace = "a/b" }), "'/'"},
		{"NUL in kind", with(func(c *Change) { c.Object.Resource.Kind = "Config\x00Map" }), "NUL"},
	}
	ctx := t.Context()
	s := openStore(t, filepath.Join(t.TempDir(), "edge.db"))
	existing := configMap("default", "existing", "1")
	require.NoError(t, s.Apply(ctx, []Change{upsert(existing)}))
	before, err := s.Inventory(ctx)
	require.NoError(t, err)

	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// A valid change before and after the bad one: neither may be written.
			err := s.Apply(ctx, []Change{upsert(good), tt.change, del(existing)})
			require.ErrorIs(t, err, ErrInvalid)
			require.ErrorContains(t, err, "apply batch: change 1 (")
			require.ErrorContains(t, err, tt.wantMsg)

			after, err := s.Inventory(ctx)
			require.NoError(t, err)
			require.Equal(t, before, after, "a refused batch must write nothing")
		})
	}
}

func TestApplyErrorQuotesLongKey(t *testing.T) {
	s := openStore(t, filepath.Join(t.TempDir(), "edge.db"))
	c := upsert(configMap("default", strings.Repeat("n", 10000), "1"))
	err := s.Apply(t.Context(), []Change{c})
	require.ErrorIs(t, err, ErrInvalid)
	require.Less(t, len(err.Error()), 400, "error must not carry the whole key: %s", err)
}

func TestList(t *testing.T) {
	a := configMap("default", "a", "1")
	b := configMap("default", "b", "1")
	c := configMap("kube-system", "c", "1")
	other := configMap("other", "a", "1")
	events := Object{Resource: message.Resource{Version: "v1", Kind: "Event", Namespace: "default", Name: "e"}, Version: "1", Data: []byte(`{}`)}
	eventsV1 := Object{Resource: message.Resource{Group: "events.k8s.io", Version: "v1", Kind: "Event", Namespace: "default", Name: "e"}, Version: "1", Data: []byte(`{}`)}
	n1, n2 := nodeObject("n1", "1"), nodeObject("n2", "1")

	ctx := t.Context()
	s := openStore(t, filepath.Join(t.TempDir(), "edge.db"))
	// Inserted out of order: List sorts.
	require.NoError(t, s.Apply(ctx, []Change{
		upsert(other), upsert(c), upsert(b), upsert(a), upsert(eventsV1), upsert(events), upsert(n2), upsert(n1),
	}))

	tests := []struct {
		kind, namespace string
		want            []Object
	}{
		{"ConfigMap", "", []Object{a, b, c, other}},
		{"ConfigMap", "default", []Object{a, b}},
		{"ConfigMap", "kube-system", []Object{c}},
		{"ConfigMap", "missing", nil},
		{"Secret", "", nil},
		{"Node", "", []Object{n1, n2}},
		{"Event", "default", []Object{events, eventsV1}},
		{"configmap", "", nil}, // kinds are case sensitive
	}
	for _, tt := range tests {
		t.Run(tt.kind+"/"+tt.namespace, func(t *testing.T) {
			got, err := s.List(ctx, tt.kind, tt.namespace)
			require.NoError(t, err)
			require.Equal(t, tt.want, got)
		})
	}

	_, err := s.List(ctx, "", "default")
	require.ErrorIs(t, err, ErrInvalid)
}

func TestDeleteByKeyHash(t *testing.T) {
	a := configMap("default", "a", "1")
	b := configMap("default", "b", "1")
	n := nodeObject("n1", "1")

	tests := []struct {
		name        string
		hashes      []uint64
		wantRemoved []objsync.Key
		wantLeft    []Object
	}{
		{name: "none", hashes: nil, wantLeft: []Object{a, b, n}},
		{name: "one", hashes: []uint64{a.Key().Hash()}, wantRemoved: []objsync.Key{a.Key()}, wantLeft: []Object{b, n}},
		{
			name:        "several in given order",
			hashes:      []uint64{n.Key().Hash(), a.Key().Hash()},
			wantRemoved: []objsync.Key{n.Key(), a.Key()},
			wantLeft:    []Object{b},
		},
		{name: "unknown hash ignored", hashes: []uint64{12345, b.Key().Hash()}, wantRemoved: []objsync.Key{b.Key()}, wantLeft: []Object{a, n}},
		{name: "duplicate hash", hashes: []uint64{b.Key().Hash(), b.Key().Hash()}, wantRemoved: []objsync.Key{b.Key()}, wantLeft: []Object{a, n}},
		{name: "high bit set", hashes: []uint64{1 << 63, ^uint64(0)}, wantLeft: []Object{a, b, n}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := t.Context()
			s := openStore(t, filepath.Join(t.TempDir(), "edge.db"))
			require.NoError(t, s.Apply(ctx, []Change{upsert(a), upsert(b), upsert(n)}))

			removed, err := s.DeleteByKeyHash(ctx, tt.hashes)
			require.NoError(t, err)
			require.Equal(t, tt.wantRemoved, removed)

			inv, err := s.Inventory(ctx)
			require.NoError(t, err)
			require.Equal(t, sortedEntries(tt.wantLeft...), inv)
		})
	}
}

func TestInventoryHashesMatchObjsync(t *testing.T) {
	ctx := t.Context()
	s := openStore(t, filepath.Join(t.TempDir(), "edge.db"))
	var objs []Object
	var changes []Change
	for i := range 200 {
		o := configMap(fmt.Sprintf("ns-%d", i%7), fmt.Sprintf("obj-%d", i), fmt.Sprint(1000+i))
		objs = append(objs, o)
		changes = append(changes, upsert(o))
	}
	require.NoError(t, s.Apply(ctx, changes))

	inv, err := s.Inventory(ctx)
	require.NoError(t, err)
	require.Equal(t, sortedEntries(objs...), inv)

	// The digest the edge computes from its inventory equals one computed
	// from the objects themselves.
	nb := objsync.BucketCount(len(objs))
	fromStore, direct := objsync.NewDigest(nb), objsync.NewDigest(nb)
	for _, e := range inv {
		fromStore.Add(e)
	}
	for _, o := range objs {
		direct.Add(entryOf(o))
	}
	require.Equal(t, direct.Buckets, fromStore.Buckets)
}

func TestInventoryUsesCoveringIndex(t *testing.T) {
	s := openStore(t, filepath.Join(t.TempDir(), "edge.db"))
	rows, err := s.r.QueryContext(t.Context(), `EXPLAIN QUERY PLAN SELECT key_hash, version_hash FROM objects ORDER BY key_hash`)
	require.NoError(t, err)
	defer rows.Close()
	var plan []string
	for rows.Next() {
		var id, parent, notUsed int
		var detail string
		require.NoError(t, rows.Scan(&id, &parent, &notUsed, &detail))
		plan = append(plan, detail)
	}
	require.NoError(t, rows.Err())
	require.Equal(t, []string{"SCAN objects USING COVERING INDEX objects_inventory"}, plan)
}

func TestConcurrentUse(t *testing.T) {
	const writers, batches, perBatch = 4, 10, 20
	ctx := t.Context()
	s := openStore(t, filepath.Join(t.TempDir(), "edge.db"))

	var wg sync.WaitGroup
	errs := make(chan error, 2*writers)
	for w := range writers {
		wg.Go(func() {
			for b := range batches {
				changes := make([]Change, 0, perBatch)
				for i := range perBatch {
					changes = append(changes, upsert(configMap(fmt.Sprintf("w%d", w), fmt.Sprintf("b%d-%d", b, i), "1")))
				}
				if err := s.Apply(ctx, changes); err != nil {
					errs <- err
					return
				}
			}
		})
		wg.Go(func() {
			for range batches {
				if _, err := s.Inventory(ctx); err != nil {
					errs <- err
					return
				}
				objs, err := s.List(ctx, "ConfigMap", fmt.Sprintf("w%d", w))
				if err != nil {
					errs <- err
					return
				}
				if len(objs)%perBatch != 0 {
					errs <- fmt.Errorf("reader saw %d objects, a partial batch", len(objs))
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	n, err := s.Count(ctx)
	require.NoError(t, err)
	require.Equal(t, writers*batches*perBatch, n)
}

// Subscribers hear the keys of each committed batch and of each delete by
// key hash, and nothing of a refused batch or after they cancel.
func TestSubscribe(t *testing.T) {
	s := openStore(t, filepath.Join(t.TempDir(), "s.db"))
	ctx := t.Context()
	var got [][]objsync.Key
	cancel := s.Subscribe(func(keys []objsync.Key) { got = append(got, slices.Clone(keys)) })

	a, b := configMap("ns", "a", "1"), configMap("ns", "b", "1")
	require.NoError(t, s.Apply(ctx, []Change{upsert(a), upsert(b)}))
	bad := configMap("ns", "c", "1")
	bad.Resource.Kind = ""
	require.Error(t, s.Apply(ctx, []Change{upsert(bad)}))
	removed, err := s.DeleteByKeyHash(ctx, []uint64{a.Key().Hash()})
	require.NoError(t, err)
	require.Equal(t, []objsync.Key{a.Key()}, removed)
	require.Equal(t, [][]objsync.Key{{a.Key(), b.Key()}, {a.Key()}}, got)

	cancel()
	cancel()
	require.NoError(t, s.Apply(ctx, []Change{del(b)}))
	require.Len(t, got, 2)
}
