// Package vm is the CRI shim's backend for virtual machines: a sandbox of
// the VM runtime handler is one QEMU process, its one container the
// guest. It reads the VM's shape from the sandbox annotations the VM
// controller puts on the pod, takes cores, hugepages and VFs from the
// resource pool, boots the guest from a qcow2 overlay of a base image of
// the edge image store, and records every VM in the store's allocation
// table, so that a restarted EdgeCore adopts the QEMUs that still run.
//
// It only runs VMs: it must not import the pod manager or the syncer, and
// it drives QEMU only through edgecore/runtime/vm/qemu.
package vm
