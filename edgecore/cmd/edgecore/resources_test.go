package main

import (
	"context"
	"io"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/edgecore/config"
	"github.com/tetheredge/tether/edgecore/resources"
)

// parseConfig runs the edgecore command with args (and the required
// --cloud and --node) and returns the configuration it would run with.
func parseConfig(t *testing.T, args ...string) (config.EdgeCoreConfiguration, error) {
	t.Helper()
	var cfg config.EdgeCoreConfiguration
	root := newCommand(func(_ context.Context, c config.EdgeCoreConfiguration) error { cfg = c; return nil })
	root.SetArgs(append([]string{"--cloud", "127.0.0.1:1", "--node", "edge-1"}, args...))
	root.SetOut(io.Discard)
	root.SetErr(io.Discard)
	err := root.ExecuteContext(t.Context())
	return cfg, err
}

// The pool's flags: off by default, its settings refused without
// --resource-pool, VF pools parsed, a bad or repeated one refused by name.
func TestPoolFlags(t *testing.T) {
	parse := func(args ...string) (*resources.Config, bool, error) {
		c, err := parseConfig(t, args...)
		if err != nil {
			return nil, false, err
		}
		pool, err := poolConfig(c.ResourcePool)
		return pool, c.ResourcePool.StaticCPUPolicy, err
	}
	cfg, _, err := parse()
	require.NoError(t, err)
	require.Nil(t, cfg)
	_, _, err = parse("--reserved-cpus", "0")
	require.ErrorContains(t, err, "need it true (flag --resource-pool)")

	cfg, static, err := parse("--resource-pool", "--reserved-cpus", "0", "--reserved-data-plane-cpus", "1",
		"--sriov-pool", "a=0000:3b:00.0,0000:3b:00.1", "--sriov-pool", "b=0000:5e:00.0", "--static-cpu-policy")
	require.NoError(t, err)
	require.True(t, static)
	require.Equal(t, &resources.Config{ReservedSystemCPUs: "0", ReservedDataPlaneCPUs: "1", VFPools: map[string][]string{
		"a": {"0000:3b:00.0", "0000:3b:00.1"}, "b": {"0000:5e:00.0"},
	}}, cfg)

	for _, bad := range []string{"a", "=0000:3b:00.0", "a="} {
		_, _, err = parse("--resource-pool", "--sriov-pool", bad)
		require.ErrorContains(t, err, "resourcePool.sriovPools[0]")
		require.ErrorContains(t, err, "want NAME=PF", bad)
	}
	_, _, err = parse("--resource-pool", "--sriov-pool", "a=0000:3b:00.0", "--sriov-pool", "a=0000:3b:00.1")
	require.ErrorContains(t, err, "resourcePool.sriovPools[1]")
	require.ErrorContains(t, err, "named twice")
}
