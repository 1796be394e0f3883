// Command mkguest builds Tether's test guest (build/guest) into a cache
// directory and prints "kernel PATH", "initrd PATH" and "cmdline ..."
// lines. `make guest` runs it so that tests find the guest built.
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/tetheredge/tether/build/guest"
)

func main() {
	out := flag.String("out", "_output/guest", "cache directory of the built initramfs")
	flag.Parse()
	p, err := guest.Build(guest.Config{CacheDir: *out})
	if err != nil {
		fmt.Fprintln(os.Stderr, "mkguest:", err)
		os.Exit(1)
	}
	fmt.Printf("kernel %s\ninitrd %s\ncmdline %s\n", p.Kernel, p.Initrd, p.Cmdline)
}
