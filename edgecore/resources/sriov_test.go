package resources

import (
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/edgecore/store"
)

// The SR-IOV tests run on the SYNTHETIC sysfs tree of synth (see there
// what the kernel would do that the tree does not): there is no SR-IOV
// NIC and no VFIO on this machine, and nothing here was tried on
// hardware.

const (
	pfA  = "0000:3b:00.0"
	pfB  = "0000:3b:00.1"
	vfA0 = "0000:3b:02.0"
	vfA1 = "0000:3b:02.1"
	vfA2 = "0000:3b:02.2"
	vfB0 = "0000:3b:0a.0"
)

func sriovConfig(s *synth) Config {
	return Config{SysfsRoot: s.root, HugepageMounts: map[int64]string{}, VFPools: map[string][]string{"a": {pfA}, "b": {pfB}}}
}

// A VF is bound through driver_override, its driver's unbind and
// drivers_probe, with its previous driver recorded; one on vfio-pci that
// the pool did not bind is not handed out; release unbinds it from
// vfio-pci, clears the override and re-probes; a restarted pool finds
// the same VFs.
func TestVFBindAndRelease(t *testing.T) {
	ctx := t.Context()
	s := newSynth(t, "0-3")
	s.pf(pfA, 8, "iavf", vfA0, vfA1, vfA2)
	s.pf(pfB, 8, "", vfB0)
	s.setDriver(vfA0, vfioDriver) // someone else's VF
	path := filepath.Join(t.TempDir(), "edge.db")
	st := openStore(t, path)
	p := newPool(t, sriovConfig(s), st)

	adv, err := p.Advertise()
	require.NoError(t, err)
	require.Equal(t, map[string]int64{"sriov.edge.tether.dev/a": 3, "sriov.edge.tether.dev/b": 1}, adv.VFs)

	g, err := p.Allocate(ctx, Request{Owner: "vm1", VFs: map[string]int{"a": 1}})
	require.NoError(t, err)
	require.Equal(t, []VF{{Pool: "a", Address: vfA1, PreviousDriver: "iavf"}}, g.VFs)
	require.Equal(t, vfioDriver, s.override(vfA1))
	require.Equal(t, vfA1, s.read("bus/pci/drivers/iavf/unbind"))
	require.Equal(t, vfA1, s.read("bus/pci/drivers_probe"))
	require.Equal(t, "(null)", s.override(vfA0), "someone else's VF is not touched")

	// An unbound VF: no unbind is written.
	s.file("bus/pci/drivers/iavf/unbind", "")
	g2, err := p.Allocate(ctx, Request{Owner: "vm2", VFs: map[string]int{"b": 1}})
	require.NoError(t, err)
	require.Equal(t, []VF{{Pool: "b", Address: vfB0}}, g2.VFs)
	require.Equal(t, vfioDriver, s.override(vfB0))
	require.Empty(t, s.read("bus/pci/drivers/iavf/unbind"))
	require.Equal(t, vfB0, s.read("bus/pci/drivers_probe"))

	// A restart finds the grant.
	require.NoError(t, st.Close())
	st = openStore(t, path)
	p = newPool(t, sriovConfig(s), st)
	got, ok, err := p.Lookup(ctx, "vm1")
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, g, got)

	// As the kernel's probe would have, vfA1 is now on vfio-pci.
	s.setDriver(vfA1, vfioDriver)
	require.NoError(t, p.Release(ctx, "vm1"))
	require.Equal(t, vfA1, s.read("bus/pci/drivers/vfio-pci/unbind"))
	require.Empty(t, s.override(vfA1), "driver_override cleared")
	require.Equal(t, vfA1, s.read("bus/pci/drivers_probe"))
	requireHoldsNothing(t, st, "vm1")

	// Idempotent: a second release writes nothing.
	s.file("bus/pci/drivers/vfio-pci/unbind", "")
	s.file("bus/pci/drivers_probe", "")
	require.NoError(t, p.Release(ctx, "vm1"))
	require.Empty(t, s.read("bus/pci/drivers/vfio-pci/unbind"))
	require.Empty(t, s.read("bus/pci/drivers_probe"))

	// As the kernel's probe would have, iavf has it back: it is free again.
	s.setDriver(vfA1, "iavf")
	g3, err := p.Allocate(ctx, Request{Owner: "vm3", VFs: map[string]int{"a": 1}})
	require.NoError(t, err)
	require.Equal(t, vfA1, g3.VFs[0].Address)
	g4, err := p.Allocate(ctx, Request{Owner: "vm4", VFs: map[string]int{"a": 1}})
	require.NoError(t, err)
	require.Equal(t, vfA2, g4.VFs[0].Address)
	_, err = p.Allocate(ctx, Request{Owner: "vm5", VFs: map[string]int{"a": 1}})
	requireInsufficient(t, err, "sriov.edge.tether.dev/a", 1, 0)
	requireHoldsNothing(t, st, "vm5")
}

// A crash between the claim and the bind: the same Allocate again binds
// the recorded VF, keeping the driver recorded before.
func TestVFAllocateAgainBinds(t *testing.T) {
	ctx := t.Context()
	s, _, p := oneVF(t)
	req := Request{Owner: "vm1", VFs: map[string]int{"a": 1}}
	g, err := p.Allocate(ctx, req)
	require.NoError(t, err)
	s.file("devices/pci0000:3b/"+vfA0+"/driver_override", "(null)\n") // as if the bind never happened
	s.file("bus/pci/drivers_probe", "")
	again, err := p.Allocate(ctx, req)
	require.NoError(t, err)
	require.Equal(t, g, again)
	require.Equal(t, vfioDriver, s.override(vfA0))
	require.Equal(t, vfA0, s.read("bus/pci/drivers_probe"))
}

// Two pools on one store (so neither's lock helps) race for the last
// VF, each also asking for a core: in every round exactly one wins, and
// the loser holds nothing, no core either, and nothing was bound for it.
func TestVFRaceForLast(t *testing.T) {
	ctx := t.Context()
	s := newSynth(t, "0-7")
	s.pf(pfA, 8, "iavf", vfA0, vfA1)
	s.pf(pfB, 8, "")
	st := openStore(t, filepath.Join(t.TempDir(), "edge.db"))
	p1, p2 := newPool(t, sriovConfig(s), st), newPool(t, sriovConfig(s), st)
	_, err := p1.Allocate(ctx, Request{Owner: "holder", VFs: map[string]int{"a": 1}})
	require.NoError(t, err)
	require.Equal(t, vfioDriver, s.override(vfA0))

	for round := range 20 {
		owners := [2]string{"w1", "w2"}
		var errs [2]error
		var grants [2]Grant
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i, p := range []*Pool{p1, p2} {
			wg.Go(func() {
				<-start
				grants[i], errs[i] = p.Allocate(ctx, Request{Owner: owners[i], DedicatedCPUs: 1, VFs: map[string]int{"a": 1}})
			})
		}
		close(start)
		wg.Wait()
		require.True(t, (errs[0] == nil) != (errs[1] == nil), "round %d: exactly one wins: %v", round, errs)
		win, lose := 0, 1
		if errs[0] != nil {
			win, lose = 1, 0
		}
		requireInsufficient(t, errs[lose], "sriov.edge.tether.dev/a", 1, 0)
		requireHoldsNothing(t, st, owners[lose])
		require.Equal(t, vfA1, grants[win].VFs[0].Address)
		require.Equal(t, vfioDriver, s.override(vfA1))
		require.NoError(t, p1.Release(ctx, owners[win]))
		require.Empty(t, s.override(vfA1))
	}
}

// A bind that fails rolls the claim back: nothing held, no core, and
// the VFs it touched restored (override cleared, re-probed) — also the
// first VF of a two-VF request whose second fails.
func TestVFBindFailureRollsBack(t *testing.T) {
	ctx := t.Context()
	s := newSynth(t, "0-3")
	s.driver("brk")
	s.pf(pfA, 8, "iavf", vfA0)
	s.pf(pfB, 8, "brk", vfB0)
	s.breakFile("bus/pci/drivers/brk/unbind")
	st := openStore(t, filepath.Join(t.TempDir(), "edge.db"))
	p := newPool(t, sriovConfig(s), st)

	_, err := p.Allocate(ctx, Request{Owner: "vm1", DedicatedCPUs: 1, VFs: map[string]int{"b": 1}})
	require.ErrorContains(t, err, "bind "+vfB0+" to vfio-pci: unbind from brk")
	require.NotErrorIs(t, err, ErrInsufficient)
	requireHoldsNothing(t, st, "vm1")
	require.Empty(t, s.override(vfB0))
	require.Equal(t, vfB0, s.read("bus/pci/drivers_probe"))
	require.InDelta(t, 1, testutil.ToFloat64(p.requests.WithLabelValues("failed")), 0)

	_, err = p.Allocate(ctx, Request{Owner: "vm2", VFs: map[string]int{"a": 1, "b": 1}})
	require.ErrorContains(t, err, "unbind from brk")
	requireHoldsNothing(t, st, "vm2")
	require.Empty(t, s.override(vfA0), "the VF bound first is restored")

	// A probe that cannot be written fails the bind too.
	s.breakFile("bus/pci/drivers_probe")
	_, err = p.Allocate(ctx, Request{Owner: "vm3", VFs: map[string]int{"a": 1}})
	require.ErrorContains(t, err, "bind "+vfA0+" to vfio-pci: probe")
	requireHoldsNothing(t, st, "vm3")
}

// A VF that cannot be restored keeps its rows: it is not handed out in a
// state the pool does not know, and a later Release finishes the job.
func TestVFReleaseFailureKeepsRows(t *testing.T) {
	ctx := t.Context()
	s, st, p := oneVF(t)
	g, err := p.Allocate(ctx, Request{Owner: "vm1", VFs: map[string]int{"a": 1}})
	require.NoError(t, err)
	s.setDriver(vfA0, vfioDriver) // the kernel's probe
	s.breakFile("bus/pci/drivers/vfio-pci/unbind")
	err = p.Release(ctx, "vm1")
	require.ErrorContains(t, err, "restore "+vfA0+": unbind from vfio-pci")
	got, ok, err := p.Lookup(ctx, "vm1")
	require.NoError(t, err)
	require.True(t, ok)
	require.Equal(t, g, got)

	require.NoError(t, os.Remove(filepath.Join(s.root, "bus/pci/drivers/vfio-pci/unbind")))
	s.file("bus/pci/drivers/vfio-pci/unbind", "")
	require.NoError(t, p.Release(ctx, "vm1"))
	requireHoldsNothing(t, st, "vm1")
	require.Equal(t, vfA0, s.read("bus/pci/drivers/vfio-pci/unbind"))
}

// oneVF is a pool whose pool a has one VF, vfA0 on iavf, and pool b none.
func oneVF(t *testing.T) (*synth, *store.Store, *Pool) {
	s := newSynth(t, "0-3")
	s.pf(pfA, 8, "iavf", vfA0)
	s.pf(pfB, 8, "")
	st := openStore(t, filepath.Join(t.TempDir(), "edge.db"))
	return s, st, newPool(t, sriovConfig(s), st)
}
