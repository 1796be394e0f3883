// Command kube-controller-manager is the Kubernetes controller manager used
// by Tether's integration tests (tests/controlplane, Options.ControllerManager),
// chiefly for its node lifecycle and taint eviction controllers.
//
// It is upstream kube-controller-manager built from k8s.io/kubernetes at the
// version pinned in build/testbin/go.mod, like kube-apiserver beside it. It
// adds nothing of its own and must not be used outside tests.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	// Upstream's binary links these for their registration side effects: the
	// JSON log format and the client-go and version metrics. Keep them so
	// this build accepts the same flags and serves the same metrics. Upstream
	// also links time/tzdata for CronJob time zones; the tests run no CronJob
	// controller, and the host has a zoneinfo database anyway.
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/kube-controller-manager/app"
)

func main() {
	os.Exit(cli.Run(app.NewControllerManagerCommand()))
}
