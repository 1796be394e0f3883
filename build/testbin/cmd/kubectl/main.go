// Command kubectl is the kubectl that `make run` gives its user: upstream
// kubectl built from the k8s.io/kubectl version that matches the pinned
// k8s.io/kubernetes in build/testbin/go.mod, so it is never more than the
// supported one minor version away from the development API server
// (Debian's packaged kubectl is v1.20). It adds nothing of its own.
package main

import (
	"os"

	// The client auth plugins (OIDC, exec) that upstream's binary links.
	_ "k8s.io/client-go/plugin/pkg/client/auth"
	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	"k8s.io/kubectl/pkg/cmd"
	"k8s.io/kubectl/pkg/cmd/util"
)

func main() {
	// Upstream sets klog's verbosity from the arguments before the command
	// is built, so that building it (plugins, .kuberc) logs at that level.
	_, _ = logs.GlogSetter(cmd.GetLogVerbosity(os.Args))
	if err := cli.RunNoErrOutput(cmd.NewDefaultKubectlCommand()); err != nil {
		util.CheckErr(err)
	}
}
