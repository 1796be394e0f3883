package main

import (
	"fmt"
	"path/filepath"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/tetheredge/tether/edgecore/app"
	"github.com/tetheredge/tether/edgecore/config"
	"github.com/tetheredge/tether/edgecore/runtime/vm"
)

// vmConfig is the VM runtime's configuration, nil when it is not
// enabled.
func vmConfig(c config.VM) *app.VMConfig {
	if !c.Enabled {
		return nil
	}
	cfg := &app.VMConfig{QEMU: c.QEMU, ImageDir: c.ImageDir, RunDir: c.RunDir, Accel: c.Accel, HugepageDirs: map[string]string{}}
	if c.Hugetlbfs2Mi != "" {
		cfg.HugepageDirs["2Mi"] = c.Hugetlbfs2Mi
	}
	if c.Hugetlbfs1Gi != "" {
		cfg.HugepageDirs["1Gi"] = c.Hugetlbfs1Gi
	}
	return cfg
}

// newVMImageCommand returns "edgecore vm-image": the edge's store of VM
// base images, which pods of the VM handler name as their image.
func newVMImageCommand() *cobra.Command {
	var dir, dataDir, qemuImg string
	open := func() (*vm.Images, error) {
		d := dir
		if d == "" {
			d = filepath.Join(dataDir, "vm-images")
		}
		return vm.OpenImages(d, qemuImg)
	}
	cmd := &cobra.Command{
		Use:   "vm-image",
		Short: "Manage the base images of virtual machines on this node",
	}
	pf := cmd.PersistentFlags()
	pf.StringVar(&dataDir, "data-dir", "/var/lib/tether/edgecore", "EdgeCore's data directory; the store is its vm-images")
	pf.StringVar(&dir, "image-dir", "", "the image store itself (overrides --data-dir)")
	pf.StringVar(&qemuImg, "qemu-img", "qemu-img", "qemu-img binary")

	var boot vm.Boot
	imp := &cobra.Command{
		Use:   "import NAME FILE",
		Short: "Copy a qcow2 or raw base image into the store as NAME",
		Long: "import copies FILE (reflinked where the filesystem can) into the store, with its sha256\n" +
			"digest, format and virtual size. VMs boot from qcow2 overlays of it: creating one copies nothing.\n" +
			"With --kernel (and --initrd, --cmdline) the guest boots that kernel directly.",
		Example: "  edgecore vm-image import tether-guest disk.raw --kernel vmlinuz --initrd initrd.gz --cmdline 'console=ttyS0'",
		Args:    cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := open()
			if err != nil {
				return err
			}
			img, err := st.Import(cmd.Context(), args[0], args[1], boot)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "%s %s %s %d\n", img.Name, img.Digest, img.Format, img.VirtualSize)
			return err
		},
	}
	imp.Flags().StringVar(&boot.Kernel, "kernel", "", "kernel for direct kernel boot")
	imp.Flags().StringVar(&boot.Initrd, "initrd", "", "initramfs for direct kernel boot")
	imp.Flags().StringVar(&boot.Cmdline, "cmdline", "", "kernel command line (default with --kernel: console=ttyS0)")

	list := &cobra.Command{
		Use:   "list",
		Short: "List the store's images",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			st, err := open()
			if err != nil {
				return err
			}
			imgs, err := st.List()
			if err != nil {
				return err
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "NAME\tDIGEST\tFORMAT\tVIRTUAL SIZE\tKERNEL\tIMPORTED")
			for _, img := range imgs {
				kernel := "-"
				if img.Kernel != "" {
					kernel = "yes"
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%s\t%s\n", img.Name, img.Digest, img.Format, img.VirtualSize, kernel,
					img.ImportedAt.Format(time.RFC3339))
			}
			return w.Flush()
		},
	}
	rm := &cobra.Command{
		Use:   "remove NAME",
		Short: "Remove an image (stop EdgeCore's VMs on it first: their disks back onto it)",
		Args:  cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			st, err := open()
			if err != nil {
				return err
			}
			return st.Remove(args[0], nil)
		},
	}
	cmd.AddCommand(imp, list, rm)
	return cmd
}
