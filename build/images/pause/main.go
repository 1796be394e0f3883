// Command pause is the sandbox process of Tether's test pods, the local
// stand-in for registry.k8s.io/pause (which cannot be pulled here).
//
// It holds the pod's namespaces open, reaps the zombies of processes that
// end up as its children (it is PID 1 of the pod), and exits 0 on SIGTERM or
// SIGINT. It must stay tiny and dependency-free: build/images builds it with
// CGO_ENABLED=0 from this one file and puts the binary alone into an image.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for sig := range sigs {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		reap()
	}
}

// reap collects every exited child without blocking: one SIGCHLD may stand
// for several exits.
func reap() {
	for {
		var status syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
		if pid <= 0 || err != nil {
			return
		}
	}
}
