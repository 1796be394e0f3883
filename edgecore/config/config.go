// Package config is EdgeCore's config file: the EdgeCoreConfiguration
// type (config.tether.dev/v1alpha1), its defaults, its loading and its
// validation. Each field's tags are the one description of it: its name
// in the file, the `edgecore` flag that overrides it and its doc, from
// which --help, `edgecore config default` and the reference in
// docs/operations.md are made (common/configfile). It only describes
// EdgeCore's settings: the command turns them into app.Config. No secret
// goes into the file: the join token is `edgecore join`'s, and the node's
// key is a file in the data directory.
package config

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/tetheredge/tether/common/configfile"
	"github.com/tetheredge/tether/edgecore/app"
)

// Kind is the kind of EdgeCore's config file.
const Kind = "EdgeCoreConfiguration"

// Duration is written as a string ("15s").
type Duration = configfile.Duration

// DefaultDataDir is the node's state directory by default.
const DefaultDataDir = "/var/lib/tether/edgecore"

// EdgeCoreConfiguration is EdgeCore's configuration. To add a setting,
// add its field here with json, flag and doc tags, its default in
// Default, a check in Validate if it has a bound, and pass it on where
// the command builds app.Config; the flag, --help, the default file and
// the docs reference follow from the tags (update the reference with
// TETHER_UPDATE_DOCS=1 go test ./edgecore/config).
type EdgeCoreConfiguration struct {
	configfile.TypeMeta `json:",inline"`

	Tunnel       Tunnel       `json:"tunnel" title:"Tunnel" doc:"The session to CloudCore."`
	Node         Node         `json:"node" title:"Node" doc:"This node: its name, its state and its identity."`
	Runtime      Runtime      `json:"runtime" title:"Container runtime" doc:"The runtime that runs this node's pods."`
	VM           VM           `json:"virtualMachines" title:"Virtual machines" doc:"The VM runtime, behind the CRI shim."`
	ResourcePool ResourcePool `json:"resourcePool" title:"Resource pool" doc:"The node's cores, hugepages and SR-IOV VFs as one pool for pods and VMs."`
	Ops          Ops          `json:"operations" title:"Operations" doc:"Logs, metrics and health."`
}

// Tunnel configures the session to the cloud.
type Tunnel struct {
	Cloud           []string `json:"cloud" flag:"cloud" doc:"Cloud addresses, tried in order: host:port (QUIC, then WebSocket), quic://host:port or wss://host:port. Required."`
	KeepAlive       Duration `json:"keepAlive" flag:"keepalive" doc:"Keepalive interval."`
	DeadPeerTimeout Duration `json:"deadPeerTimeout" flag:"dead-peer-timeout" doc:"Silence after which the cloud is declared gone; more than keepAlive."`
}

// Node configures the node's name, state and identity.
type Node struct {
	Name    string `json:"name" flag:"node" doc:"This node's name (must match the certificate). Required."`
	DataDir string `json:"dataDir" flag:"data-dir" doc:"Directory of the node's state: SQLite store and its identity (node.pem: key and certificate, ca.crt), from edgecore join or renewals."`
	TLSCert string `json:"tlsCert" flag:"tls-cert" doc:"Node certificate (PEM), never rewritten: renewals are stored in dataDir and loaded instead once newer; default: the identity edgecore join stored in dataDir."`
	TLSKey  string `json:"tlsKey" flag:"tls-key" doc:"Node private key (PEM); default: from dataDir."`
	CA      string `json:"ca" flag:"ca" doc:"Cluster CA (PEM); default: from dataDir."`
}

// Runtime configures the pod manager's container runtime.
type Runtime struct {
	Endpoint   string `json:"containerRuntimeEndpoint" flag:"container-runtime-endpoint" doc:"CRI endpoint the pod manager drives, such as unix:///run/containerd/containerd.sock; empty with criListen: the in-process CRI shim; empty without: EdgeCore runs no pods and its Node stays NotReady (ContainerRuntimeUnreachable)."`
	CRIListen  string `json:"criListen" flag:"cri-listen" doc:"Serve EdgeCore's CRI shim on this unix socket, in front of containerd (empty: no shim)."`
	Containerd string `json:"containerd" flag:"containerd" doc:"containerd's CRI endpoint, behind the shim."`
}

// VM configures the VM runtime (also the flags of `edgecore cri`).
type VM struct {
	Enabled      bool   `json:"enabled" flag:"vm" doc:"Run virtual machines for the VM runtime handler (QEMU; acceleration probed at startup)."`
	QEMU         string `json:"qemu" flag:"vm-qemu" doc:"QEMU binary."`
	ImageDir     string `json:"imageDir" flag:"vm-image-dir" doc:"VM base image store (default: vm-images in the data directory)."`
	RunDir       string `json:"runDir" flag:"vm-run-dir" doc:"VMs' runtime files (overlays, QMP sockets); keep it short."`
	Hugetlbfs2Mi string `json:"hugetlbfs2Mi" flag:"vm-hugetlbfs-2mi" doc:"hugetlbfs mount of 2 MiB pages for VMs asking for hugepages-2Mi."`
	Hugetlbfs1Gi string `json:"hugetlbfs1Gi" flag:"vm-hugetlbfs-1gi" doc:"hugetlbfs mount of 1 GiB pages for VMs asking for hugepages-1Gi."`
	Accel        string `json:"accel" flag:"vm-accel" doc:"Force kvm or tcg instead of probing (empty: probe)."`
}

// ResourcePool configures edgecore/resources.
type ResourcePool struct {
	Enabled               bool     `json:"enabled" flag:"resource-pool" doc:"Manage the node's cores, hugepages and SR-IOV VFs as one pool for pods and VMs (dedicated CPUs and VFs need it)."`
	ReservedCPUs          string   `json:"reservedCPUs" flag:"reserved-cpus" doc:"With enabled: cores kept for the system and EdgeCore, as a CPU list (0-1); not allocatable."`
	ReservedDataPlaneCPUs string   `json:"reservedDataPlaneCPUs" flag:"reserved-data-plane-cpus" doc:"With enabled: cores kept for the data plane, as a CPU list; not allocatable."`
	SRIOVPools            []string `json:"sriovPools" flag:"sriov-pool,array" doc:"With enabled: VF pools, each NAME=PF[,PF...] (PCI addresses of physical functions); the flag is repeatable."`
	StaticCPUPolicy       bool     `json:"staticCPUPolicy" flag:"static-cpu-policy" doc:"With enabled: Guaranteed pods with whole cores get cores of their own (kubelet's static CPU policy)."`
}

// Ops configures logs and the operations endpoint.
type Ops struct {
	LogLevel    string `json:"logLevel" flag:"log-level" doc:"debug, info, warn or error."`
	MetricsAddr string `json:"metricsAddr" flag:"metrics-addr" doc:"TCP address of /metrics, /healthz, /livez and /readyz (\"\" or 0 disables; local only by default)."`
}

// Default returns the defaults.
func Default() EdgeCoreConfiguration {
	return EdgeCoreConfiguration{
		TypeMeta: configfile.TypeMeta{APIVersion: configfile.APIVersion, Kind: Kind},
		Tunnel:   Tunnel{KeepAlive: Duration{Duration: 5 * time.Second}, DeadPeerTimeout: Duration{Duration: 15 * time.Second}},
		Node:     Node{DataDir: DefaultDataDir},
		Runtime:  Runtime{Containerd: app.DefaultContainerd},
		VM:       DefaultVM(),
		Ops:      Ops{LogLevel: "info", MetricsAddr: app.DefaultMetricsAddr},
	}
}

// DefaultVM is the VM runtime's defaults, also those of `edgecore cri`.
func DefaultVM() VM { return VM{QEMU: "qemu-system-x86_64", RunDir: app.DefaultVMRunDir} }

// Load returns the defaults overlaid with the file at path (strictly:
// unknown fields are refused), not yet validated.
func Load(path string) (EdgeCoreConfiguration, error) {
	cfg := Default()
	if err := configfile.Load(path, Kind, &cfg); err != nil {
		return EdgeCoreConfiguration{}, err
	}
	return cfg, nil
}

// DefaultFile is the commented default file `edgecore config default`
// prints.
func DefaultFile() []byte {
	return configfile.Render(Default(), "EdgeCore's configuration: edgecore --config FILE. Every field is optional "+
		"but tunnel.cloud and node.name; the values below are the defaults. A flag given on the command line overrides its field. "+
		"The join token never goes here: it is edgecore join's (--token-file or TETHER_JOIN_TOKEN).")
}

// Reference is the config reference of docs/operations.md.
func Reference() string { return configfile.Reference(Default()) }

// Validate checks c once, at start, and names each field it refuses.
func (c EdgeCoreConfiguration) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...)))
	}
	if len(c.Tunnel.Cloud) == 0 {
		bad("tunnel.cloud", "required (flag --cloud)")
	}
	for i, a := range c.Tunnel.Cloud {
		if strings.TrimSpace(a) == "" {
			bad(fmt.Sprintf("tunnel.cloud[%d]", i), "empty address")
		}
	}
	if c.Tunnel.KeepAlive.Duration <= 0 {
		bad("tunnel.keepAlive", "must be > 0, got %s", c.Tunnel.KeepAlive)
	}
	if c.Tunnel.DeadPeerTimeout.Duration <= c.Tunnel.KeepAlive.Duration {
		bad("tunnel.deadPeerTimeout", "must be > tunnel.keepAlive (%s), got %s", c.Tunnel.KeepAlive, c.Tunnel.DeadPeerTimeout)
	}
	if c.Node.Name == "" {
		bad("node.name", "required (flag --node)")
	}
	if c.Node.DataDir == "" {
		bad("node.dataDir", "must not be empty")
	}
	if set := c.Node.TLSCert != "" || c.Node.TLSKey != "" || c.Node.CA != ""; set && (c.Node.TLSCert == "" || c.Node.TLSKey == "" || c.Node.CA == "") {
		bad("node.tlsCert", "node.tlsCert, node.tlsKey and node.ca go together")
	}
	if err := c.VM.Validate(); err != nil {
		errs = append(errs, err)
	}
	if _, err := c.ResourcePool.VFPools(); err != nil {
		errs = append(errs, err)
	}
	if p := c.ResourcePool; !p.Enabled && (p.ReservedCPUs != "" || p.ReservedDataPlaneCPUs != "" || len(p.SRIOVPools) > 0 || p.StaticCPUPolicy) {
		bad("resourcePool.enabled", "resourcePool.reservedCPUs, reservedDataPlaneCPUs, sriovPools and staticCPUPolicy need it true (flag --resource-pool)")
	}
	if _, err := configfile.ParseLevel(c.Ops.LogLevel); err != nil {
		bad("operations.logLevel", "want debug, info, warn or error, got %q", c.Ops.LogLevel)
	}
	return errors.Join(errs...)
}

// Validate checks the VM runtime's settings.
func (v VM) Validate() error {
	switch v.Accel {
	case "", "kvm", "tcg":
	default:
		return fmt.Errorf("virtualMachines.accel: want kvm, tcg or empty (probe), got %q", v.Accel)
	}
	if v.Enabled && v.QEMU == "" {
		return errors.New("virtualMachines.qemu: must not be empty")
	}
	return nil
}

// VFPools returns the SR-IOV pools by name, or an error naming the entry
// of sriovPools that is not NAME=PF[,PF...] or names a pool twice.
func (p ResourcePool) VFPools() (map[string][]string, error) {
	var out map[string][]string
	for i, e := range p.SRIOVPools {
		name, pfs, ok := strings.Cut(e, "=")
		if !ok || name == "" || pfs == "" {
			return nil, fmt.Errorf("resourcePool.sriovPools[%d]: %q: want NAME=PF[,PF...]", i, e)
		}
		if _, dup := out[name]; dup {
			return nil, fmt.Errorf("resourcePool.sriovPools[%d]: %q: pool %s named twice", i, e, name)
		}
		if out == nil {
			out = map[string][]string{}
		}
		out[name] = strings.Split(pfs, ",")
	}
	return out, nil
}
