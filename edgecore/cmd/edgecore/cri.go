package main

import (
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"

	"github.com/tetheredge/tether/common/configfile"
	"github.com/tetheredge/tether/common/logging"
	"github.com/tetheredge/tether/edgecore/app"
	"github.com/tetheredge/tether/edgecore/config"
)

type criFlags struct {
	cfg      app.CRIConfig
	vm       config.VM
	state    string
	logLevel string
}

// newCRICommand returns "edgecore cri": the CRI shim alone, for any CRI
// client (crictl, a kubelet) to drive.
func newCRICommand() *cobra.Command {
	f := criFlags{vm: config.DefaultVM()}
	cmd := &cobra.Command{
		Use:   "cri",
		Short: "Serve EdgeCore's CRI shim alone, in front of containerd",
		Long: "cri serves the CRI v1 RuntimeService and ImageService on --listen and routes each\n" +
			"sandbox by its runtime handler: --handlers go to containerd, --vm-handler to the VM runtime\n" +
			"with --vm (refused without). Which backend owns each id is kept in --state.",
		Example: "  edgecore cri --listen /run/tether/cri.sock --containerd unix:///run/containerd/containerd.sock",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var level slog.Level
			if err := level.UnmarshalText([]byte(f.logLevel)); err != nil {
				return fmt.Errorf("log level %q: %w", f.logLevel, err)
			}
			logger := logging.New(os.Stderr, level)
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			if err := f.vm.Validate(); err != nil {
				return err
			}
			f.cfg.VM = vmConfig(f.vm)
			c, err := app.NewCRI(ctx, f.cfg, f.state, logger, prometheus.NewRegistry())
			if err != nil {
				return err
			}
			defer c.Close()
			return c.Run(ctx)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.cfg.Listen, "listen", "/run/tether/cri.sock", "unix socket to serve the CRI on")
	fl.StringVar(&f.cfg.Containerd, "containerd", app.DefaultContainerd, "containerd's CRI endpoint")
	fl.StringSliceVar(&f.cfg.Handlers, "handlers", []string{"", "runc"}, "runtime handlers containerd serves")
	fl.StringVar(&f.cfg.VMHandler, "vm-handler", "tether-vm", "runtime handler of virtual machines")
	fl.DurationVar(&f.cfg.CallTimeout, "call-timeout", 30*time.Second, "deadline of each CRI call")
	fl.DurationVar(&f.cfg.PullTimeout, "pull-timeout", 2*time.Minute, "deadline of each image pull")
	fl.StringVar(&f.state, "state", "/var/lib/tether/cri/state.db", "SQLite file of the sandbox and container id map")
	fl.StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
	if _, err := configfile.Bind(&f.vm, fl, false); err != nil {
		// config.VM's type is wrong: a programming error.
		panic(err)
	}
	return cmd
}
