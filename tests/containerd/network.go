package containerd

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/tetheredge/tether/build/cni"
)

// Network is the CNI bridge network of a host started WithCNI: build/cni's
// conflist with its own bridge, subnet and IPAM directory, so that hosts of
// test binaries running side by side never share addresses. Slot N (1-254,
// held by an flock in os.TempDir()/tether-cni while the host lives) gives
// the bridge tetherN and the subnet 10.250.N.0/24, gateway 10.250.N.1.
type Network struct {
	// Name is the CNI network name (tetherN).
	Name string
	// Bridge is the Linux bridge the pods' veths join.
	Bridge string
	// Subnet is where pod addresses come from; Gateway is the bridge's.
	Subnet  netip.Prefix
	Gateway netip.Addr
	// ConfList is the installed conflist file.
	ConfList string

	lock *os.File
}

// installNetwork takes a free slot and writes the conflist for it.
func installNetwork(confDir, ipamDir string) (*Network, error) {
	lockDir := filepath.Join(os.TempDir(), "tether-cni")
	if err := os.MkdirAll(lockDir, 0o755); err != nil {
		return nil, fmt.Errorf("take CNI slot: %w", err)
	}
	for slot := 1; slot <= 254; slot++ {
		f, err := os.OpenFile(filepath.Join(lockDir, fmt.Sprintf("%d.lock", slot)), os.O_CREATE|os.O_RDWR, 0o644)
		if err != nil {
			return nil, fmt.Errorf("take CNI slot: %w", err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			f.Close()
			continue
		}
		n := &Network{
			Name:    fmt.Sprintf("tether%d", slot),
			Bridge:  fmt.Sprintf("tether%d", slot),
			Subnet:  netip.MustParsePrefix(fmt.Sprintf("10.250.%d.0/24", slot)),
			Gateway: netip.MustParseAddr(fmt.Sprintf("10.250.%d.1", slot)),
			lock:    f,
		}
		n.ConfList = filepath.Join(confDir, cni.FileName)
		if err := n.write(ipamDir); err != nil {
			n.release()
			return nil, err
		}
		return n, nil
	}
	return nil, errors.New("take CNI slot: all 254 slots are in use")
}

// write installs cni.Conflist with this slot's name, bridge, range and IPAM
// directory; everything else is as shipped.
func (n *Network) write(ipamDir string) error {
	var conf map[string]any
	if err := json.Unmarshal(cni.Conflist, &conf); err != nil {
		return fmt.Errorf("parse %s: %w", cni.FileName, err)
	}
	conf["name"] = n.Name
	plugins, _ := conf["plugins"].([]any)
	found := false
	for _, p := range plugins {
		plugin, _ := p.(map[string]any)
		if plugin["type"] != "bridge" {
			continue
		}
		ipam, _ := plugin["ipam"].(map[string]any)
		if ipam == nil {
			return fmt.Errorf("parse %s: bridge plugin without ipam", cni.FileName)
		}
		plugin["bridge"] = n.Bridge
		ipam["ranges"] = []any{[]any{map[string]any{"subnet": n.Subnet.String(), "gateway": n.Gateway.String()}}}
		ipam["dataDir"] = ipamDir
		found = true
	}
	if !found {
		return fmt.Errorf("parse %s: no bridge plugin", cni.FileName)
	}
	b, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return fmt.Errorf("render conflist: %w", err)
	}
	if err := os.WriteFile(n.ConfList, b, 0o644); err != nil {
		return fmt.Errorf("write conflist: %w", err)
	}
	return nil
}

// remove deletes the bridge (the bridge plugin creates it on the first ADD
// and never deletes it) and frees the slot.
func (n *Network) remove() error {
	defer n.release()
	if _, err := net.InterfaceByName(n.Bridge); err != nil {
		return nil // never created: no pod joined the network
	}
	out, err := exec.Command("ip", "link", "delete", n.Bridge).CombinedOutput()
	if err != nil {
		return fmt.Errorf("delete bridge %s: %w: %s", n.Bridge, err, strings.TrimSpace(string(out)))
	}
	return nil
}

func (n *Network) release() {
	if n.lock != nil {
		_ = n.lock.Close() // closing drops the flock
		n.lock = nil
	}
}
