package qemu

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// The real probe on this host. Here (a nested VM whose /dev/kvm opens)
// it answers tcg: QEMU aborts with -cpu host ("failed to set MSR 0x10a")
// and a KVM guest with -cpu qemu64 hangs in SeaBIOS. The test holds any
// host to the probe's contract: kvm with no reason, or tcg with the
// reason and a TCG run that worked.
func TestProbe(t *testing.T) {
	r, err := ProbeAccel(t.Context(), ProbeConfig{})
	require.NoError(t, err)
	t.Logf("probe: accel=%s reason=%q kvm=%s tcg=%s", r.Accel, r.Reason, r.KVMTook, r.TCGTook)
	switch r.Accel {
	case AccelKVM:
		require.Empty(t, r.Reason)
		require.Zero(t, r.TCGTook)
	case AccelTCG:
		require.NotEmpty(t, r.Reason)
		require.Positive(t, r.TCGTook)
	default:
		t.Fatalf("accel %q", r.Accel)
	}
	accel, err := Probe(t.Context(), "")
	require.NoError(t, err)
	require.Equal(t, r.Accel, accel)

	_, err = Probe(t.Context(), "/nonexistent/qemu")
	require.ErrorContains(t, err, "find qemu")
}

// A guest that makes no progress is a hang at the deadline, whatever the
// host: a boot sector that spins (jmp $) never exits QEMU. The same run
// with the probe's own boot sector exits 85 under TCG.
func TestProbeDetectsHang(t *testing.T) {
	bin, err := lookPath(DefaultBinary)
	require.NoError(t, err)
	dir := t.TempDir()
	spin := bootSector()
	copy(spin, []byte{0xeb, 0xfe}) // jmp $
	spinDisk := filepath.Join(dir, "spin.img")
	require.NoError(t, os.WriteFile(spinDisk, spin, 0o600))
	_, err = runProbeGuest(t.Context(), bin, spinDisk, AccelTCG, cpuModel(AccelTCG), 2*time.Second)
	require.ErrorIs(t, err, errProbeHang)

	okDisk := filepath.Join(dir, "ok.img")
	require.NoError(t, os.WriteFile(okDisk, bootSector(), 0o600))
	_, err = runProbeGuest(t.Context(), bin, okDisk, AccelTCG, cpuModel(AccelTCG), time.Minute)
	require.NoError(t, err)
}
