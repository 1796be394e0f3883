package vm_test

import (
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/tetheredge/tether/edgecore/resources"
	"github.com/tetheredge/tether/edgecore/runtime/vm"
	"github.com/tetheredge/tether/tests/testlog"
	"github.com/tetheredge/tether/tests/vmguest"
)

// A VM whose QEMU died while EdgeCore was down (the host rebooted; here
// the test kills it): the new backend records the container exited
// (QEMUGone), reports the sandbox NOTREADY, gives its dedicated core back
// to the pool (the real pool on the real store and CPUs), and converts
// what was left of its console. Failed before the backend released it:
// the grant was still there.
func TestLostVMReleasesItsGrant(t *testing.T) {
	e := newEnv(t)
	ctx := t.Context()
	pool, err := resources.New(resources.Config{HugepageMounts: map[int64]string{}}, e.st.Allocations(), testlog.New())
	require.NoError(t, err)
	e.cfg.Pool = pool
	b1, err := vm.New(ctx, e.cfg, e.st.Allocations())
	require.NoError(t, err)
	sb, id, console := e.startVM(b1, "lost", map[string]string{vm.AnnotationDedicatedCPUs: "true"})
	g, ok, err := pool.Lookup(ctx, sb)
	require.NoError(t, err)
	require.True(t, ok)
	require.Len(t, g.CPUs, 1)
	pid := qemuPid(t, e.st, sb)
	require.NoError(t, b1.Close(ctx))
	require.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
	_, err = syscall.Wait4(pid, nil, 0, nil)
	require.NoError(t, err)

	b2 := e.backend()
	st, err := b2.PodSandboxStatus(ctx, sb, false)
	require.NoError(t, err)
	require.Equal(t, runtimeapi.PodSandboxState_SANDBOX_NOTREADY, st.GetStatus().GetState())
	cs, err := b2.ContainerStatus(ctx, id, false)
	require.NoError(t, err)
	require.Equal(t, runtimeapi.ContainerState_CONTAINER_EXITED, cs.GetStatus().GetState())
	require.Equal(t, "QEMUGone", cs.GetStatus().GetReason())
	_, ok, err = pool.Lookup(ctx, sb)
	require.NoError(t, err)
	require.False(t, ok, "the lost VM's grant is released")
	rows, err := e.st.Allocations().Owner(ctx, sb)
	require.NoError(t, err)
	require.Len(t, rows, 1, "only the VM record is left")
	require.Equal(t, vm.KindVM, rows[0].Kind)
	all, err := pool.Allocate(ctx, resources.Request{Owner: "every-core", DedicatedCPUs: len(g.CPUs) + len(g.SharedCPUs)})
	require.NoError(t, err, "the core is free again")
	require.NoError(t, pool.Release(ctx, "every-core"))
	require.NotEmpty(t, all.CPUs)
	require.Equal(t, 1, vmguest.CountMarker(console, vm.BootMarker))

	require.NoError(t, b2.StopPodSandbox(ctx, sb))
	require.NoError(t, b2.RemovePodSandbox(ctx, sb))
	left, err := e.st.Allocations().Kind(ctx, "")
	require.NoError(t, err)
	require.Empty(t, left)
}
