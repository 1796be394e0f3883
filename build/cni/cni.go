// Package cni holds Tether's example CNI network for pods at the edge,
// 10-tether-bridge.conflist, so that tests install the very file the docs
// show (docs/runtime.md).
//
// The network: Debian's containernetworking-plugins (in /usr/lib/cni) give
// each pod a veth on the Linux bridge tether0 and an address from the private
// subnet 10.250.0.0/24 (host-local IPAM, gateway 10.250.0.1 on the bridge,
// a default route through it); ipMasq masquerades the pods' traffic leaving
// the node, hairpinMode lets a pod reach itself through a Service-like
// address, and portmap serves hostPort mappings. containerd sets up the
// pod's loopback itself. To use it with a containerd, copy it into the CRI
// plugin's cni.conf_dir (/etc/cni/net.d by default); pick another subnet if
// 10.250.0.0/24 is in use on the site.
//
// The package only carries the file; it never touches the network.
package cni

import _ "embed" // the conflist

// Conflist is the content of 10-tether-bridge.conflist.
//
//go:embed 10-tether-bridge.conflist
var Conflist []byte

// FileName is the name the conflist is installed under.
const FileName = "10-tether-bridge.conflist"
