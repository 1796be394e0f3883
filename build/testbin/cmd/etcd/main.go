// Command etcd is the etcd server used by Tether's integration tests.
//
// It is upstream etcd built from its Go module at the version pinned in
// build/testbin/go.mod, so the tests never download a prebuilt binary. It
// adds nothing of its own and must not be used outside tests.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
