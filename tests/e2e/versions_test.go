package e2e

import (
	"context"
	"fmt"
	"maps"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/cloudcore/dispatch"
	"github.com/tetheredge/tether/common/message"
	"github.com/tetheredge/tether/common/objsync"
	"github.com/tetheredge/tether/edgecore/store"
	"github.com/tetheredge/tether/edgecore/syncer"
)

// objsyncV1 is the sync payload as peers that predate sub-buckets encode
// and decode it: the six elements before caps and sub.
type objsyncV1 struct {
	_struct bool `codec:",toarray"` //nolint:unused // encode as an array

	Phase   objsync.Phase
	Count   uint32
	Buckets []uint64
	Entries []objsync.Entry
	Hashes  []uint64
	More    bool
}

// versionsWorld is the cloud's desired state for one node, by key: the
// catalog's view, as dispatch.Lookup.
type versionsWorld map[objsync.Key]store.Object

func (w versionsWorld) Keys() []objsync.Key { return slices.Collect(maps.Keys(w)) }

func (w versionsWorld) Lookup(k objsync.Key) (uint64, any, bool) {
	o, ok := w[k]
	if !ok {
		return 0, nil, false
	}
	return objsync.VersionHash(o.Resource.UID, o.Version), o, true
}

// versionsPair runs one session between the edge's and the cloud's sync
// state machines (syncer.Edge over a real SQLite store, dispatch.Node over
// versionsWorld), every sync payload encoded on the way. A side marked old
// speaks the payload as it did before sub-buckets: its encoder writes six
// elements and its decoder reads six.
type versionsPair struct {
	t                  *testing.T
	st                 *store.Store
	codec              *message.Codec
	oldEdge, oldCloud  bool
	edge               *syncer.Edge
	node               *dispatch.Node
	world              versionsWorld
	listed, listsBySub int // entries listed, lists naming sub-buckets
	reconciled         bool
}

// wire encodes p as its sender does and decodes it as its receiver does.
func (v *versionsPair) wire(p *objsync.Sync, oldSender, oldReceiver bool) objsync.Sync {
	var b []byte
	var err error
	if oldSender {
		b, err = v.codec.Append(nil, &objsyncV1{Phase: p.Phase, Count: p.Count, Buckets: p.Buckets, Entries: p.Entries, Hashes: p.Hashes, More: p.More})
	} else {
		b, err = v.codec.Append(nil, p)
	}
	require.NoError(v.t, err)
	var out objsync.Sync
	if oldReceiver {
		var o objsyncV1
		require.NoError(v.t, v.codec.UnmarshalValue(b, &o))
		out = objsync.Sync{Phase: o.Phase, Count: o.Count, Buckets: o.Buckets, Entries: o.Entries, Hashes: o.Hashes, More: o.More}
	} else {
		require.NoError(v.t, v.codec.UnmarshalValue(b, &out))
	}
	require.NoError(v.t, out.Validate())
	return out
}

// toEdge turns the cloud's actions into messages and feeds them to the edge.
func (v *versionsPair) toEdge(now time.Time, acts []dispatch.Action) {
	for _, a := range acts {
		m := &message.Message{ID: a.ID}
		switch a.Kind {
		case dispatch.SendObject:
			o := a.Object.(store.Object)
			m.Kind, m.Op, m.Resource, m.Version, m.Payload = message.KindEvent, message.OpUpsert, o.Resource, o.Version, o.Data
		case dispatch.SendDelete:
			m.Kind, m.Op = message.KindEvent, message.OpDelete
			m.Resource = message.Resource{Group: a.Key.Group, Kind: a.Key.Kind, Namespace: a.Key.Namespace, Name: a.Key.Name}
		default:
			p := objsync.Sync{Phase: map[dispatch.ActionKind]objsync.Phase{
				dispatch.SendWant: objsync.PhaseWant, dispatch.SendPrune: objsync.PhasePrune, dispatch.SendDone: objsync.PhaseDone,
			}[a.Kind], Buckets: a.Buckets, Sub: a.Sub, Hashes: a.Hashes}
			got := v.wire(&p, v.oldCloud, v.oldEdge)
			b, err := v.codec.Append(nil, &got)
			require.NoError(v.t, err)
			m.Kind, m.Payload = message.KindSync, b
		}
		v.runEdge(now, v.edge.Receive(now, m))
	}
	v.runEdge(now, v.edge.Flush(now))
}

// runEdge does the edge's actions: the store's work for real, and what
// it sends handed to the cloud.
func (v *versionsPair) runEdge(now time.Time, acts []syncer.Action) {
	ctx := context.Background()
	for len(acts) > 0 {
		a := acts[0]
		acts = acts[1:]
		var more []syncer.Action
		switch a.Kind {
		case syncer.ReadInventory:
			inv, err := v.st.Inventory(ctx)
			require.NoError(v.t, err)
			more = v.edge.OnInventory(now, inv)
		case syncer.ApplyChanges:
			require.NoError(v.t, v.st.Apply(ctx, a.Changes))
			more = v.edge.OnCommitted(now)
		case syncer.PruneHashes:
			_, err := v.st.DeleteByKeyHash(ctx, a.Hashes)
			require.NoError(v.t, err)
			more = v.edge.OnCommitted(now)
		case syncer.ReadOutbox:
			more = v.edge.OnOutbox(now, nil)
		case syncer.SendAck:
			v.node.OnAck(a.ReplyTo)
		case syncer.SendRefuse:
			require.Failf(v.t, "the edge refused", "%s: %s", a.Reason, a.Detail)
		case syncer.Reconciled:
			v.reconciled = true
		case syncer.SendSync:
			p := v.wire(a.Sync, v.oldEdge, v.oldCloud)
			switch p.Phase {
			case objsync.PhaseDigest:
				v.toEdge(now, v.node.OnDigest(p, v.world))
			case objsync.PhaseList:
				v.listed += len(p.Entries)
				if p.Caps&objsync.CapSubBuckets != 0 {
					v.listsBySub++
				}
				cloudActs, err := v.node.OnList(p, v.world)
				require.NoError(v.t, err)
				v.toEdge(now, cloudActs)
			}
		}
		acts = append(more, acts...)
	}
}

// session runs a session from the edge's start until nothing moves.
func (v *versionsPair) session() {
	now := time.Unix(1000, 0)
	v.edge, v.node, v.listed, v.listsBySub, v.reconciled = syncer.NewEdge(syncer.Config{}), dispatch.NewNode(dispatch.Config{}), 0, 0, false
	v.runEdge(now, v.edge.Start(now))
	for range 100 {
		next := v.node.Next(now, v.world)
		if len(next) == 0 {
			break
		}
		v.toEdge(now, next)
	}
	require.True(v.t, v.reconciled, "the cloud sent Done")
	require.Zero(v.t, v.node.InFlight(), "everything acked")
}

func versionsPod(ns, name, uid, rv string) store.Object {
	return store.Object{
		Resource: message.Resource{Version: "v1", Kind: "Pod", Namespace: ns, Name: name, UID: uid},
		Version:  rv,
		Data:     fmt.Appendf(nil, `{"apiVersion":"v1","kind":"Pod","metadata":{"namespace":%q,"name":%q,"uid":%q,"resourceVersion":%q}}`, ns, name, uid, rv),
	}
}

// TestReconcileAcrossVersions: sub-buckets are negotiated, so an edge
// and a cloud reconcile to exactly the objects the edge must hold whether
// either, both or neither predates them; only the bytes listed differ.
// The edge is the real syncer on a real SQLite store, the cloud the real
// dispatch state machine, and every sync payload is encoded and decoded
// on the way, by an old peer in the layout it had before.
func TestReconcileAcrossVersions(t *testing.T) {
	listed := map[string]int{}
	for _, tc := range []struct {
		name              string
		oldEdge, oldCloud bool
	}{
		{"new edge, new cloud", false, false},
		{"old edge, new cloud", true, false},
		{"new edge, old cloud", false, true},
		{"old edge, old cloud", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st, err := store.Open(context.Background(), filepath.Join(t.TempDir(), "edge.db"), nil)
			require.NoError(t, err)
			t.Cleanup(func() { _ = st.Close() })
			world := versionsWorld{}
			for i := range 400 {
				o := versionsPod("default", fmt.Sprintf("p-%03d", i), fmt.Sprintf("uid-%d", i), "1")
				world[o.Key()] = o
			}
			v := &versionsPair{t: t, st: st, codec: message.NewCodec(0), oldEdge: tc.oldEdge, oldCloud: tc.oldCloud, world: world}
			v.session() // an empty store: everything sent
			requireStoreHolds(t, st, world)

			// Away: 5 pods change, 2 are deleted, 2 created, 1 recreated
			// under a new uid at the same resourceVersion.
			for i := range 5 {
				o := versionsPod("default", fmt.Sprintf("p-%03d", i*61), fmt.Sprintf("uid-%d", i*61), "2")
				world[o.Key()] = o
			}
			delete(world, versionsPod("default", "p-007", "", "").Key())
			delete(world, versionsPod("default", "p-211", "", "").Key())
			for _, name := range []string{"new-a", "new-b"} {
				o := versionsPod("default", name, "uid-"+name, "1")
				world[o.Key()] = o
			}
			o := versionsPod("default", "p-333", "uid-333-again", "1")
			world[o.Key()] = o

			v.session()
			requireStoreHolds(t, st, world)
			listed[tc.name] = v.listed
			require.Equal(t, !tc.oldEdge && !tc.oldCloud, v.listsBySub > 0, "lists by sub-bucket only between two new peers")

			v.session() // nothing changed: nothing listed
			requireStoreHolds(t, st, world)
			require.Zero(t, v.listed)
		})
	}
	t.Logf("entries listed on the reconnect: %v", listed)
	require.Less(t, 2*listed["new edge, new cloud"], listed["old edge, new cloud"])
	require.Equal(t, listed["old edge, new cloud"], listed["new edge, old cloud"])
	require.Equal(t, listed["old edge, new cloud"], listed["old edge, old cloud"])
}

func requireStoreHolds(t *testing.T, st *store.Store, world versionsWorld) {
	t.Helper()
	inv, err := st.Inventory(context.Background())
	require.NoError(t, err)
	got := map[uint64]uint64{}
	for _, e := range inv {
		got[e.Key] = e.Version
	}
	want := map[uint64]uint64{}
	for k, o := range world {
		want[k.Hash()] = objsync.VersionHash(o.Resource.UID, o.Version)
	}
	require.Equal(t, want, got)
}
