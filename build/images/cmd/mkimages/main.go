// Command mkimages writes Tether's local images (tether.local/pause:1 and
// tether.local/busybox:1) as docker archives into the image cache and prints
// one "REF PATH" line per image, for scripts that import them into a
// containerd (`ctr -n k8s.io images import PATH`). Tests do not need it: they
// call build/images directly.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/tetheredge/tether/build/images"
)

func main() {
	var cfg images.Config
	flag.StringVar(&cfg.CacheDir, "cache", "", "image cache directory (default <module root>/_output/images)")
	flag.StringVar(&cfg.Busybox, "busybox", "", "static busybox binary (default /bin/busybox)")
	flag.Parse()
	archives, err := images.All(context.Background(), cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "mkimages:", err)
		os.Exit(1)
	}
	for _, a := range archives {
		fmt.Println(a.Ref, a.Path)
	}
}
