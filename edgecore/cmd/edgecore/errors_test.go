package main

import (
	"net"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// EdgeCore started on a data directory nobody joined into says to join
// first, naming the file it looked for and the command, not a file of
// an earlier version's layout.
func TestNoIdentitySaysJoin(t *testing.T) {
	dir := t.TempDir()
	_, err := runEdgecore(t, "--cloud", "127.0.0.1:1", "--node", "edge-1", "--data-dir", dir, "--metrics-addr", "0")
	require.ErrorContains(t, err, "no node identity in "+dir+" (no node.pem): join this node first (edgecore join --cloud HOST:10002 --node edge-1")
	require.NotContains(t, err.Error(), "node.crt")
}

// A join to an address where nothing listens says which address to give.
func TestJoinRefusedSaysWhichAddress(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	require.NoError(t, ln.Close())
	// Well formed, so that the join gets as far as the request.
	t.Setenv(TokenEnv, "tj1.abcdefgh.abcdefghijklmnopqrstuvwxyz."+strings.Repeat("0", 64))
	_, err = runEdgecore(t, "join", "--cloud", addr, "--node", "edge-1", "--data-dir", t.TempDir())
	require.ErrorContains(t, err, "connection refused; nothing listens at "+addr+": give --cloud CloudCore's join endpoint (its --join-addr")
}
