// Package config is CloudCore's config file: the CloudCoreConfiguration
// type (config.tether.dev/v1alpha1), its defaults, its loading and its
// validation. Each field's tags are the one description of it: its name
// in the file, the `cloudcore` flag that overrides it and its doc, from
// which --help, `cloudcore config default` and the reference in
// docs/operations.md are made (common/configfile). It only describes
// CloudCore's settings: the command turns them into app.Config, and no
// secret goes into the file.
package config

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/tetheredge/tether/cloudcore/app"
	"github.com/tetheredge/tether/cloudcore/catalog"
	"github.com/tetheredge/tether/cloudcore/onboard"
	"github.com/tetheredge/tether/common/configfile"
	"github.com/tetheredge/tether/tunnel"
)

// Kind is the kind of CloudCore's config file.
const Kind = "CloudCoreConfiguration"

// Duration is written as a string ("15s").
type Duration = configfile.Duration

// CloudCoreConfiguration is CloudCore's configuration. To add a setting,
// add its field here with json, flag and doc tags, its default in
// defaults, a check in Validate if it has a bound, and pass it on where
// the command builds app.Config; the flag, --help, the default file and
// the docs reference follow from the tags (update the reference with
// TETHER_UPDATE_DOCS=1 go test ./cloudcore/config).
type CloudCoreConfiguration struct {
	configfile.TypeMeta `json:",inline"`

	Tunnel     Tunnel     `json:"tunnel" title:"Tunnel" doc:"The tunnel edges connect over: QUIC on UDP, WebSocket over TLS on TCP where UDP is blocked."`
	Onboarding Onboarding `json:"onboarding" title:"Onboarding and certificates" doc:"Joins, the cluster CA and the certificates CloudCore issues."`
	Kubernetes Kubernetes `json:"kubernetes" title:"Kubernetes" doc:"The API server CloudCore reads and writes."`
	Edges      Edges      `json:"edges" title:"Edge nodes" doc:"What CloudCore lets edge nodes be and do."`
	VM         VM         `json:"virtualMachines" title:"Virtual machines" doc:"The VirtualMachine controller."`
	Replicas   Replicas   `json:"replicas" title:"Replicas" doc:"How several CloudCore replicas share the edges (docs/protocol.md, Rebalancing)."`
	Ops        Ops        `json:"operations" title:"Operations" doc:"Logs, metrics and health."`
}

// Tunnel configures the tunnel server.
type Tunnel struct {
	QUICAddr        string   `json:"quicAddr" flag:"quic-addr" doc:"UDP address for the QUIC tunnel (empty disables)."`
	WebSocketAddr   string   `json:"webSocketAddr" flag:"websocket-addr" doc:"TCP address for the WebSocket-over-TLS tunnel (empty disables)."`
	KeepAlive       Duration `json:"keepAlive" flag:"keepalive" doc:"Keepalive interval."`
	DeadPeerTimeout Duration `json:"deadPeerTimeout" flag:"dead-peer-timeout" doc:"Silence after which an edge is declared gone; more than keepAlive."`
	MaxHandshakes   int      `json:"maxHandshakes" flag:"max-handshakes" doc:"QUIC handshakes (TLS and hello) in flight at once; a connection past it is refused at once and the edge retries after its back-off, so that a reconnect storm does not starve the established sessions. -1: no bound."`
}

// Onboarding configures joins and certificates.
type Onboarding struct {
	JoinAddr     string   `json:"joinAddr" flag:"join-addr" doc:"TCP address of the HTTPS join endpoint."`
	ServerSANs   []string `json:"serverSANs" flag:"server-san" doc:"DNS names and IPs edges use to reach CloudCore (load balancer addresses too): set it to every one of them. Empty: the host name of the machine CloudCore starts on, localhost and 127.0.0.1, found at start (a file written on one machine stays right for another); enough for a single host, never for a load balancer."`
	CertValidity Duration `json:"certValidity" flag:"cert-validity" doc:"Validity of node certificates (renewed at 80%)."`
	CANamespace  string   `json:"caNamespace" flag:"ca-namespace" doc:"Namespace of the cluster CA Secret."`
	CASecret     string   `json:"caSecret" flag:"ca-secret" doc:"Name of the cluster CA Secret (created if absent)."`
}

// Kubernetes configures the API clients.
type Kubernetes struct {
	Kubeconfig string  `json:"kubeconfig" flag:"kubeconfig" doc:"Kubeconfig of the cluster (empty: in-cluster config)."`
	QPS        float32 `json:"qps" flag:"kube-api-qps" doc:"API requests per second of each Kubernetes client (one writes edges' leases and status, one the rest)."`
	Burst      int     `json:"burst" flag:"kube-api-burst" doc:"API request burst of each Kubernetes client."`
}

// Edges configures what edges may be and do.
type Edges struct {
	Label             string   `json:"label" flag:"edge-label" doc:"Label that marks a Node as an edge node."`
	RegisterTaintKeys []string `json:"registerTaintKeys" flag:"edge-register-taint-keys" doc:"Taint keys an edge may put on its own Node when it registers (default none)."`
	OfflineAutonomy   Duration `json:"offlineAutonomy" flag:"offline-autonomy" doc:"How long CloudCore keeps renewing the lease of a trusted edge node that lost its session, so it stays Ready and its pods are not evicted (0 disables)."`
}

// VM configures the VirtualMachine controller.
type VM struct {
	Controller  bool `json:"controller" flag:"vm-controller" doc:"Run the VirtualMachine controller (VMs -> pods with runtimeClassName tether-vm; needs the CRD and RuntimeClass from build/)."`
	LeaderElect bool `json:"leaderElect" flag:"vm-leader-elect" doc:"Run the VirtualMachine controller only while holding the Lease tether-vm-controller in the CA namespace, so several CloudCore replicas can run (false: only with one replica)."`
}

// Replicas configures rebalancing between CloudCore replicas.
type Replicas struct {
	Rebalance       bool     `json:"rebalance" flag:"rebalance" doc:"Publish this replica's session count in a Lease in the CA namespace and move edges to less loaded replicas."`
	AdvertiseAddr   string   `json:"advertiseAddr" flag:"advertise-addr" doc:"Address edges reach this replica by (as in edgecore --cloud), the hint other replicas give edges they move here (empty: none; moved edges go on with their own list)."`
	RebalancePeriod Duration `json:"rebalancePeriod" flag:"rebalance-period" doc:"How often the session count is published and rebalancing decided."`
}

// Ops configures logs and the operations endpoint.
type Ops struct {
	LogLevel    string `json:"logLevel" flag:"log-level" doc:"debug, info, warn or error."`
	MetricsAddr string `json:"metricsAddr" flag:"metrics-addr" doc:"TCP address of /metrics, /healthz, /livez and /readyz (\"\" or 0 disables; local only by default)."`
	Pprof       bool   `json:"pprof" flag:"pprof" doc:"Also serve Go's profiles (net/http/pprof) under /debug/pprof/ on the operations endpoint."`
}

// Default returns the defaults. They hold nothing of the machine that
// calls it: onboarding.serverSANs is empty, and SANs resolves it where
// CloudCore starts.
func Default() CloudCoreConfiguration {
	return CloudCoreConfiguration{
		TypeMeta: configfile.TypeMeta{APIVersion: configfile.APIVersion, Kind: Kind},
		Tunnel: Tunnel{
			QUICAddr: ":10000", WebSocketAddr: ":10000",
			KeepAlive: Duration{Duration: 5 * time.Second}, DeadPeerTimeout: Duration{Duration: 15 * time.Second},
			MaxHandshakes: tunnel.DefaultMaxHandshakes,
		},
		Onboarding: Onboarding{
			JoinAddr: onboard.DefaultAddr, CertValidity: Duration{Duration: onboard.DefaultValidity},
			CANamespace: onboard.DefaultCANamespace, CASecret: onboard.DefaultCAName,
		},
		Kubernetes: Kubernetes{QPS: app.DefaultQPS, Burst: app.DefaultBurst},
		Edges:      Edges{Label: catalog.DefaultEdgeLabel, OfflineAutonomy: Duration{Duration: 24 * time.Hour}},
		VM:         VM{Controller: true, LeaderElect: true},
		Replicas:   Replicas{Rebalance: true, RebalancePeriod: Duration{Duration: 10 * time.Second}},
		Ops:        Ops{LogLevel: "info", MetricsAddr: app.DefaultMetricsAddr},
	}
}

// Load returns the defaults overlaid with the file at path (strictly:
// unknown fields are refused), not yet validated.
func Load(path string) (CloudCoreConfiguration, error) {
	cfg := Default()
	if err := configfile.Load(path, Kind, &cfg); err != nil {
		return CloudCoreConfiguration{}, err
	}
	return cfg, nil
}

// DefaultFile is the commented default file `cloudcore config default`
// prints.
func DefaultFile() []byte { return configfile.Render(Default(), fileHeader) }

const fileHeader = "CloudCore's configuration: cloudcore --config FILE. Every field is optional; " +
	"the values below are the defaults. A flag given on the command line overrides its field."

// Reference is the config reference of docs/operations.md: the fields
// with their defaults.
func Reference() string { return configfile.Reference(Default()) }

// SANs returns the names and IPs of CloudCore's server certificate:
// ServerSANs, or when it is empty the host name of this machine (as
// hostname reports it; os.Hostname when nil), localhost and 127.0.0.1.
func (o Onboarding) SANs(hostname func() (string, error)) []string {
	if len(o.ServerSANs) > 0 {
		return o.ServerSANs
	}
	if hostname == nil {
		hostname = os.Hostname
	}
	sans := []string{"localhost", "127.0.0.1"}
	if host, err := hostname(); err == nil && host != "" {
		sans = append([]string{host}, sans...)
	}
	return sans
}

// Validate checks c once, at start, and names each field it refuses.
func (c CloudCoreConfiguration) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...)))
	}
	if c.Tunnel.QUICAddr == "" && c.Tunnel.WebSocketAddr == "" {
		bad("tunnel.quicAddr", "tunnel.quicAddr and tunnel.webSocketAddr are both empty: at least one transport is needed")
	}
	for _, a := range []struct{ field, addr string }{
		{"tunnel.quicAddr", c.Tunnel.QUICAddr}, {"tunnel.webSocketAddr", c.Tunnel.WebSocketAddr}, {"onboarding.joinAddr", c.Onboarding.JoinAddr},
	} {
		if a.addr == "" && a.field != "onboarding.joinAddr" {
			continue
		}
		if _, _, err := net.SplitHostPort(a.addr); err != nil {
			bad(a.field, "want host:port or :port, got %q", a.addr)
		}
	}
	if c.Tunnel.KeepAlive.Duration <= 0 {
		bad("tunnel.keepAlive", "must be > 0, got %s", c.Tunnel.KeepAlive)
	}
	if c.Tunnel.DeadPeerTimeout.Duration <= c.Tunnel.KeepAlive.Duration {
		bad("tunnel.deadPeerTimeout", "must be > tunnel.keepAlive (%s), got %s", c.Tunnel.KeepAlive, c.Tunnel.DeadPeerTimeout)
	}
	if c.Tunnel.MaxHandshakes == 0 || c.Tunnel.MaxHandshakes < -1 {
		bad("tunnel.maxHandshakes", "must be > 0, or -1 for no bound, got %d", c.Tunnel.MaxHandshakes)
	}
	for _, san := range c.Onboarding.ServerSANs {
		if strings.TrimSpace(san) == "" {
			bad("onboarding.serverSANs", "an empty name in %q", c.Onboarding.ServerSANs)
			break
		}
	}
	if c.Onboarding.CertValidity.Duration <= 0 {
		bad("onboarding.certValidity", "must be > 0, got %s", c.Onboarding.CertValidity)
	}
	if c.Onboarding.CANamespace == "" {
		bad("onboarding.caNamespace", "must not be empty")
	}
	if c.Onboarding.CASecret == "" {
		bad("onboarding.caSecret", "must not be empty")
	}
	if c.Replicas.RebalancePeriod.Duration <= 0 {
		bad("replicas.rebalancePeriod", "must be > 0, got %s", c.Replicas.RebalancePeriod)
	}
	if c.Kubernetes.QPS <= 0 {
		bad("kubernetes.qps", "must be > 0, got %v", c.Kubernetes.QPS)
	}
	if c.Kubernetes.Burst <= 0 {
		bad("kubernetes.burst", "must be > 0, got %d", c.Kubernetes.Burst)
	}
	if c.Edges.Label == "" {
		bad("edges.label", "must not be empty")
	}
	if c.Edges.OfflineAutonomy.Duration < 0 {
		bad("edges.offlineAutonomy", "must be >= 0 (0 disables), got %s", c.Edges.OfflineAutonomy)
	}
	if _, err := configfile.ParseLevel(c.Ops.LogLevel); err != nil {
		bad("operations.logLevel", "want debug, info, warn or error, got %q", c.Ops.LogLevel)
	}
	return errors.Join(errs...)
}
