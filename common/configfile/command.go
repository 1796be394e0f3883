package configfile

import (
	"context"
	"fmt"

	"github.com/spf13/cobra"
)

// Daemon describes a daemon's configuration to Command.
type Daemon[T any] struct {
	// Kind is the file's kind.
	Kind string
	// Defaults returns the defaults.
	Defaults func() T
	// Validate checks a configuration, naming the fields it refuses.
	Validate func(T) error
	// DefaultFile is what `config default` prints.
	DefaultFile func() []byte
}

// Command makes root a daemon's command: its flags are the
// configuration's (Bind), --config FILE reads a file, --help lists them by
// group, and `root config default` prints the default file. run gets the
// defaults overlaid with the file, overlaid with the flags given,
// validated; nothing else has started when a bad file or flag is refused.
func Command[T any](root *cobra.Command, d Daemon[T], run func(context.Context, T) error) error {
	var path string
	fromFlags := d.Defaults()
	flags, err := Bind(&fromFlags, root.Flags(), true)
	if err != nil {
		return err
	}
	root.Flags().StringVar(&path, "config", "", d.Kind+" file (YAML); flags given override it")
	flags.SetUsage(root)
	root.RunE = func(cmd *cobra.Command, _ []string) error {
		cfg := d.Defaults()
		if path != "" {
			if err := Load(path, d.Kind, &cfg); err != nil {
				return err
			}
		}
		flags.Apply(&cfg)
		if err := d.Validate(cfg); err != nil {
			return fmt.Errorf("invalid configuration:\n%w", err)
		}
		return run(cmd.Context(), cfg)
	}
	cfgCmd := &cobra.Command{Use: "config", Short: "Print the " + d.Kind + " file", Args: cobra.NoArgs}
	cfgCmd.AddCommand(&cobra.Command{
		Use:   "default",
		Short: "Print the default configuration as a commented " + d.Kind + " file",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, err := cmd.OutOrStdout().Write(d.DefaultFile())
			return err
		},
	})
	root.AddCommand(cfgCmd)
	return nil
}
