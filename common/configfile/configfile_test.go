package configfile

import (
	"io/fs"
	"path/filepath"
	"testing"
	"time"

	"github.com/spf13/pflag"
	"github.com/stretchr/testify/require"
)

type testConfig struct {
	TypeMeta `json:",inline"`
	Group    struct {
		Wait  Duration `json:"wait" flag:"wait" doc:"How long."`
		Names []string `json:"names" flag:"name,array" doc:"Names."`
	} `json:"group" title:"Group" doc:"A group."`
	Top string `json:"top" flag:"top" doc:"At the top."`
}

// A refused file leaves the configuration as it was, also the fields
// decoded before the one refused.
func TestDecodeRefusedChangesNothing(t *testing.T) {
	var c testConfig
	c.Group.Wait.Duration = time.Second
	c.Top = "default"
	before := c
	err := Decode([]byte("apiVersion: config.tether.dev/v1alpha1\nkind: Test\ngroup:\n  wait: 3s\ntop: x\nzzz: 1\n"), "Test", &c)
	require.EqualError(t, err, "zzz: unknown field")
	require.Equal(t, before, c)
	require.NoError(t, Decode([]byte("apiVersion: config.tether.dev/v1alpha1\nkind: Test\ngroup:\n  wait: 3s\n"), "Test", &c))
	require.Equal(t, 3*time.Second, c.Group.Wait.Duration)
	require.Equal(t, "default", c.Top)
}

// Only the flags set on the command line are applied; an array flag keeps
// commas inside its values; a flag bound twice is refused.
func TestBindApply(t *testing.T) {
	var fromFlags testConfig
	fromFlags.Top = "default"
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	f, err := Bind(&fromFlags, fs, true)
	require.NoError(t, err)
	require.NoError(t, fs.Parse([]string{"--wait", "2s", "--name", "a,b", "--name", "c"}))
	var loaded testConfig
	loaded.Top = "from file"
	f.Apply(&loaded)
	require.Equal(t, 2*time.Second, loaded.Group.Wait.Duration)
	require.Equal(t, []string{"a,b", "c"}, loaded.Group.Names)
	require.Equal(t, "from file", loaded.Top)
	require.Contains(t, fs.Lookup("wait").Usage, "(file: group.wait)")

	_, err = Bind(&fromFlags, fs, true)
	require.ErrorContains(t, err, "bound twice")
}

// A missing file is named once, with the reason, and is still a
// fs.ErrNotExist to callers that check.
func TestLoadMissingFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "absent.yaml")
	var c testConfig
	err := Load(path, "Test", &c)
	require.EqualError(t, err, "open config file "+path+": no such file or directory")
	require.ErrorIs(t, err, fs.ErrNotExist)

	dir := t.TempDir()
	require.EqualError(t, Load(dir, "Test", &c), "read config file "+dir+": is a directory")
}
