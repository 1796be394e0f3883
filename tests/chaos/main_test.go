// Package chaos runs CloudCore and two EdgeCores as separate processes over
// a lossy, delayed, partitioned loopback path (tests/netproxy), churns the
// objects bound to the edges, kills each process with SIGKILL and restarts
// it, and then checks that every edge holds exactly what the API server
// says it must, that no edge ever went back to an older version of an
// object, that the outboxes drained and that the nodes are Ready.
//
// `go test ./tests/chaos` runs the short schedule (about a minute per
// transport, both transports in parallel); `-chaos.full` or
// TETHER_CHAOS_FULL=1 runs the full one (two minutes). See docs/testing.md.
package chaos

import (
	"flag"
	"os"
	"testing"

	"github.com/tetheredge/tether/tests/controlplane"
)

var cp controlplane.Shared

var fullFlag = flag.Bool("chaos.full", false, "run the full chaos schedule (two minutes); TETHER_CHAOS_FULL=1 does the same")

// fullRun reports whether the full schedule was asked for.
func fullRun() bool { return *fullFlag || os.Getenv("TETHER_CHAOS_FULL") == "1" }

func TestMain(m *testing.M) {
	// The same binary is CloudCore or EdgeCore when the parent starts it
	// as a child: it then runs no test.
	if spec := os.Getenv(childEnv); spec != "" {
		os.Exit(runChild(spec))
	}
	os.Exit(cp.RunChecked(m))
}
