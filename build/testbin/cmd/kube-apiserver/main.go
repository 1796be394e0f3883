// Command kube-apiserver is the Kubernetes API server used by Tether's
// integration tests.
//
// It is upstream kube-apiserver built from k8s.io/kubernetes at the version
// pinned in build/testbin/go.mod, so the tests never download a prebuilt
// binary. It adds nothing of its own and must not be used outside tests.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	// Upstream's binary links these for their registration side effects: the
	// JSON log format and the client-go and version metrics. Keep them so
	// this build accepts the same flags and serves the same metrics.
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {
	os.Exit(cli.Run(app.NewAPIServerCommand()))
}
