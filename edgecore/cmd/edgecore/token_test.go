package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

const testToken = "tj1.abcdef.0123456789abcdef.sha256:00"

func writeToken(t *testing.T, mode os.FileMode, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "token")
	require.NoError(t, os.WriteFile(p, []byte(content), 0o600))
	require.NoError(t, os.Chmod(p, mode)) // past the umask
	return p
}

func TestJoinToken(t *testing.T) {
	env := func(v string) func(string) string {
		return func(k string) string {
			if k == TokenEnv {
				return v
			}
			return ""
		}
	}
	good := writeToken(t, 0o600, testToken+"\n")
	for name, tc := range map[string]struct {
		f       joinFlags
		env     string
		want    string
		wantErr string
	}{
		"flag":           {f: joinFlags{token: testToken}, want: testToken},
		"file":           {f: joinFlags{tokenFile: good}, want: testToken},
		"file 0400":      {f: joinFlags{tokenFile: writeToken(t, 0o400, testToken)}, want: testToken},
		"env":            {env: " " + testToken + "\n", want: testToken},
		"none":           {wantErr: "a join token is required: --token-file, TETHER_JOIN_TOKEN or --token"},
		"flag and file":  {f: joinFlags{token: testToken, tokenFile: good}, wantErr: "the join token is given --token and --token-file: give it one way"},
		"file and env":   {f: joinFlags{tokenFile: good}, env: testToken, wantErr: "the join token is given --token-file and TETHER_JOIN_TOKEN"},
		"flag and env":   {f: joinFlags{token: testToken}, env: testToken, wantErr: "the join token is given --token and TETHER_JOIN_TOKEN"},
		"group readable": {f: joinFlags{tokenFile: writeToken(t, 0o640, testToken)}, wantErr: "has mode 0640: it must not be readable or writable by group or others"},
		"world readable": {f: joinFlags{tokenFile: writeToken(t, 0o604, testToken)}, wantErr: "has mode 0604"},
		"group writable": {f: joinFlags{tokenFile: writeToken(t, 0o620, testToken)}, wantErr: "has mode 0620"},
		"empty file":     {f: joinFlags{tokenFile: writeToken(t, 0o600, " \n")}, wantErr: "is empty"},
		"huge file":      {f: joinFlags{tokenFile: writeToken(t, 0o600, strings.Repeat("x", maxTokenFile+1))}, wantErr: "larger than 4096 bytes"},
		"missing file":   {f: joinFlags{tokenFile: filepath.Join(t.TempDir(), "nope")}, wantErr: "open token file"},
		"directory":      {f: joinFlags{tokenFile: t.TempDir()}, wantErr: "is not a regular file"},
	} {
		t.Run(name, func(t *testing.T) {
			got, err := joinToken(tc.f, env(tc.env))
			if tc.wantErr != "" {
				require.ErrorContains(t, err, tc.wantErr)
				require.Empty(t, got)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.want, got)
		})
	}
}

// The flag checks of `edgecore join` run before any request: a refused
// token file is left in place and nothing is written to --data-dir.
func TestJoinCommandRefusesTokenTwoWays(t *testing.T) {
	tok := writeToken(t, 0o600, testToken)
	dir := t.TempDir()
	t.Setenv(TokenEnv, testToken)
	root := newRootCommand()
	root.SetArgs([]string{"join", "--cloud", "127.0.0.1:1", "--node", "edge-1", "--data-dir", dir, "--token-file", tok})
	root.SetOut(new(strings.Builder))
	err := root.Execute()
	require.ErrorContains(t, err, "the join token is given --token-file and TETHER_JOIN_TOKEN")
	require.FileExists(t, tok)
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	require.Empty(t, entries)
}
