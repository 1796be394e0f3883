package resources

import (
	"path/filepath"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/edgecore/store"
)

// EdgeCore killed between a grant and its owner's record: the VM backend's
// Allocate done, its "vm" row never written (the crash injected by
// stopping right there, on a real store and a real Pool over a SYNTHETIC
// sysfs). Restarted, the orphan holds a core and a VF that no one will
// release (a request for the free cores fails). Sweep releases it and a
// gone pod's cores, restores the VF, counts and keeps what keep knows:
// the VM with its record, the live pod. Without Sweep, the request after
// the restart stays ErrInsufficient (the test's check before the sweep).
func TestSweepReleasesOrphans(t *testing.T) {
	ctx := t.Context()
	s := newSynth(t, "0-3")
	s.pf(pfA, 8, "iavf", vfA1)
	s.pf(pfB, 8, "")
	path := filepath.Join(t.TempDir(), "edge.db")
	st := openStore(t, path)
	cfg := sriovConfig(s)
	p := newPool(t, cfg, st)

	_, err := p.Allocate(ctx, Request{Owner: "sb-crashed", DedicatedCPUs: 1, VFs: map[string]int{"a": 1}})
	require.NoError(t, err)
	// (killed here: no record)
	_, err = p.Allocate(ctx, Request{Owner: "sb-kept", DedicatedCPUs: 1})
	require.NoError(t, err)
	require.NoError(t, st.Allocations().Claim(ctx, "sb-kept", []store.Allocation{{Kind: "vm", Item: "sb-kept", Detail: []byte(`{}`)}}, nil))
	for _, owner := range []string{"pod/uid-live/c", "pod/uid-gone/c"} {
		_, err = p.Allocate(ctx, Request{Owner: owner, DedicatedCPUs: 1})
		require.NoError(t, err)
	}
	s.setDriver(vfA1, vfioDriver) // as the kernel's probe would have
	require.NoError(t, st.Close())

	st = openStore(t, path)
	reg := prometheus.NewRegistry()
	cfg.Registerer = reg
	p = newPool(t, cfg, st)
	_, err = p.Allocate(ctx, Request{Owner: "new", DedicatedCPUs: 2})
	require.ErrorIs(t, err, ErrInsufficient, "the orphans hold their cores after the restart")

	keep := func(owner string) bool { return owner == "sb-kept" || owner == "pod/uid-live/c" }
	s.file("bus/pci/drivers_probe", "")
	released, err := p.Sweep(ctx, keep)
	require.NoError(t, err)
	require.ElementsMatch(t, []string{"sb-crashed", "pod/uid-gone/c"}, released)
	requireHoldsNothing(t, st, "sb-crashed")
	requireHoldsNothing(t, st, "pod/uid-gone/c")
	require.Empty(t, s.override(vfA1), "the VF's driver_override cleared")
	require.Equal(t, vfA1, s.read("bus/pci/drivers_probe"), "the VF re-probed")
	kept, err := st.Allocations().Owner(ctx, "sb-kept")
	require.NoError(t, err)
	require.Len(t, kept, 3, "the recorded VM keeps its core, grant and record")
	_, ok, err := p.Lookup(ctx, "pod/uid-live/c")
	require.NoError(t, err)
	require.True(t, ok)
	require.InDelta(t, 2, testutil.ToFloat64(p.swept), 0)
	n, err := testutil.GatherAndCount(reg, "tether_edge_resources_swept_total")
	require.NoError(t, err)
	require.Equal(t, 1, n, "registered")

	_, err = p.Allocate(ctx, Request{Owner: "new", DedicatedCPUs: 2})
	require.NoError(t, err, "the orphans' cores are free again")
	released, err = p.Sweep(ctx, func(o string) bool { return keep(o) || o == "new" })
	require.NoError(t, err)
	require.Empty(t, released, "a second sweep finds nothing")
}

// A VF that cannot be restored keeps its owner's rows, named in the
// error; the sweep still releases the others.
func TestSweepReleaseFailure(t *testing.T) {
	ctx := t.Context()
	s := newSynth(t, "0-3")
	s.pf(pfA, 8, "iavf", vfA1)
	s.pf(pfB, 8, "")
	st := openStore(t, filepath.Join(t.TempDir(), "edge.db"))
	p := newPool(t, sriovConfig(s), st)
	_, err := p.Allocate(ctx, Request{Owner: "sb-vf", VFs: map[string]int{"a": 1}})
	require.NoError(t, err)
	_, err = p.Allocate(ctx, Request{Owner: "sb-cpu", DedicatedCPUs: 1})
	require.NoError(t, err)
	s.breakFile("bus/pci/devices/" + vfA1 + "/driver_override")
	released, err := p.Sweep(ctx, func(string) bool { return false })
	require.ErrorContains(t, err, `release "sb-vf"`)
	require.Equal(t, []string{"sb-cpu"}, released)
	rows, err := st.Allocations().Owner(ctx, "sb-vf")
	require.NoError(t, err)
	require.NotEmpty(t, rows, "the VF is not handed out in a state the pool does not know")
	requireHoldsNothing(t, st, "sb-cpu")
}
