package e2e

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// socket is one of this process's sockets as the kernel shows it in
// /proc/self/net/{udp,udp6,tcp,tcp6}: its local and remote addresses
// (IPv4-mapped IPv6 addresses unmapped) and its state (TCP's; 07 is an
// unconnected UDP socket).
type socket struct {
	local, remote netip.AddrPort
	state         string
}

// ownSockets lists this process's sockets of proto ("udp" or "tcp"), IPv4
// and IPv6: the kernel's table of the network namespace, filtered by the
// socket inodes of this process's open descriptors.
func ownSockets(t *testing.T, proto string) []socket {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	inodes := map[string]bool{}
	for _, fd := range fds {
		target, err := os.Readlink(filepath.Join("/proc/self/fd", fd.Name()))
		if err != nil {
			continue // closed meanwhile
		}
		if ino, ok := strings.CutPrefix(target, "socket:["); ok {
			inodes[strings.TrimSuffix(ino, "]")] = true
		}
	}
	var out []socket
	for _, table := range []string{proto, proto + "6"} {
		b, err := os.ReadFile(filepath.Join("/proc/self/net", table))
		require.NoError(t, err)
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		for _, line := range lines[1:] {
			f := strings.Fields(line)
			require.GreaterOrEqual(t, len(f), 10, "a line of /proc/self/net/%s: %q", table, line)
			if !inodes[f[9]] {
				continue
			}
			local, err := procAddr(f[1])
			require.NoError(t, err, "/proc/self/net/%s: %q", table, line)
			remote, err := procAddr(f[2])
			require.NoError(t, err, "/proc/self/net/%s: %q", table, line)
			out = append(out, socket{local: local, remote: remote, state: f[3]})
		}
	}
	return out
}

// procAddr parses an address of /proc/net/{tcp,udp}[6]: the address in hex
// as the kernel holds it (32-bit words in host order, little-endian here),
// a colon and the port in hex.
func procAddr(s string) (netip.AddrPort, error) {
	h, p, ok := strings.Cut(s, ":")
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("address %q has no port", s)
	}
	raw, err := hex.DecodeString(h)
	if err != nil || (len(raw) != 4 && len(raw) != 16) {
		return netip.AddrPort{}, fmt.Errorf("address %q: not 4 or 16 bytes of hex", s)
	}
	for i := 0; i < len(raw); i += 4 {
		binary.BigEndian.PutUint32(raw[i:], binary.LittleEndian.Uint32(raw[i:]))
	}
	port, err := strconv.ParseUint(p, 16, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("port of %q: %w", s, err)
	}
	addr, _ := netip.AddrFromSlice(raw)
	return netip.AddrPortFrom(addr.Unmap(), uint16(port)), nil
}
