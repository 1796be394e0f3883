package main

import (
	"testing"

	"github.com/spf13/pflag"
	"github.com/stretchr/testify/require"

	"github.com/tetheredge/tether/edgecore/resources"
)

// The pool's flags: off by default, its settings refused without
// --resource-pool, VF pools parsed, a bad or repeated one refused by name.
func TestPoolFlags(t *testing.T) {
	parse := func(args ...string) (*resources.Config, bool, error) {
		fl := pflag.NewFlagSet("edgecore", pflag.ContinueOnError)
		var f poolFlags
		addPoolFlags(fl, &f)
		require.NoError(t, fl.Parse(args))
		cfg, err := f.config()
		return cfg, f.static, err
	}
	cfg, _, err := parse()
	require.NoError(t, err)
	require.Nil(t, cfg)
	_, _, err = parse("--reserved-cpus", "0")
	require.ErrorContains(t, err, "need --resource-pool")

	cfg, static, err := parse("--resource-pool", "--reserved-cpus", "0", "--reserved-data-plane-cpus", "1",
		"--sriov-pool", "a=0000:3b:00.0,0000:3b:00.1", "--sriov-pool", "b=0000:5e:00.0", "--static-cpu-policy")
	require.NoError(t, err)
	require.True(t, static)
	require.Equal(t, &resources.Config{ReservedSystemCPUs: "0", ReservedDataPlaneCPUs: "1", VFPools: map[string][]string{
		"a": {"0000:3b:00.0", "0000:3b:00.1"}, "b": {"0000:5e:00.0"},
	}}, cfg)

	for _, bad := range []string{"a", "=0000:3b:00.0", "a="} {
		_, _, err = parse("--resource-pool", "--sriov-pool", bad)
		require.ErrorContains(t, err, "want NAME=PF", bad)
	}
	_, _, err = parse("--resource-pool", "--sriov-pool", "a=0000:3b:00.0", "--sriov-pool", "a=0000:3b:00.1")
	require.ErrorContains(t, err, "named twice")
}
