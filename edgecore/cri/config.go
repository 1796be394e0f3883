package cri

import (
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Backend names, as the id map stores them.
const (
	// BackendDefault is containerd: the default handler, runc and every
	// handler in Config.Handlers.
	BackendDefault = "containerd"
	// BackendVM is the virtual machine backend, for Config.VMHandler.
	BackendVM = "vm"
)

// Config configures the shim. Zero values mean the defaults beside each
// field; New fills them into a copy.
type Config struct {
	// Listen is the unix socket path the shim serves on. Required for Run.
	Listen string
	// Handlers are the runtime handlers the default backend serves.
	// Default ["", "runc"]; list every handler containerd is configured
	// with.
	Handlers []string
	// VMHandler is the runtime handler of virtual machines, served by the
	// VM backend. Default "tether-vm".
	VMHandler string
	// CallTimeout bounds each call (ExecSync: its own timeout plus this).
	// Default 30 s. A shorter deadline of the caller is kept.
	CallTimeout time.Duration
	// PullTimeout bounds PullImage. Default 2 min.
	PullTimeout time.Duration
	// Logger defaults to a discard logger.
	Logger *slog.Logger
	// Registerer receives the shim's metrics; nil registers nowhere.
	Registerer prometheus.Registerer
}

// Defaults.
const (
	DefaultVMHandler   = "tether-vm"
	DefaultCallTimeout = 30 * time.Second
	DefaultPullTimeout = 2 * time.Minute
)

func (c Config) withDefaults() (Config, error) {
	if c.Handlers == nil {
		c.Handlers = []string{"", "runc"}
	}
	c.Handlers = slices.Clone(c.Handlers)
	if c.VMHandler == "" {
		c.VMHandler = DefaultVMHandler
	}
	if slices.Contains(c.Handlers, c.VMHandler) {
		return c, fmt.Errorf("cri: handler %q is both a containerd handler and the VM handler", c.VMHandler)
	}
	if c.CallTimeout == 0 {
		c.CallTimeout = DefaultCallTimeout
	}
	if c.PullTimeout == 0 {
		c.PullTimeout = DefaultPullTimeout
	}
	if c.CallTimeout < 0 || c.PullTimeout < 0 {
		return c, errors.New("cri: negative timeout")
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c, nil
}
