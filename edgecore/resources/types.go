// Package resources is the edge node's one resource pool: the cores,
// hugepages and SR-IOV virtual functions that pods and virtual machines
// draw on together. It decides what a sandbox gets (which cores, which VFs,
// which hugetlbfs mount), records every grant in the store's allocation
// table so that a restarted EdgeCore finds the same grants, and releases
// them when the sandbox goes. It must not start or stop anything: the
// runtime backends use what it grants.
package resources

import (
	"errors"
	"fmt"
)

// Hugepage sizes, in bytes.
const (
	Hugepage2Mi int64 = 2 << 20
	Hugepage1Gi int64 = 1 << 30
)

// Request is what one sandbox asks of the pool. Allocate grants all of it
// or nothing.
type Request struct {
	// Owner is the CRI sandbox id the grant belongs to. Required.
	Owner string
	// DedicatedCPUs is how many whole cores the owner gets for itself
	// alone (one per vCPU of a VM with dedicated CPUs). Zero: it runs on
	// the shared set.
	DedicatedCPUs int
	// HugepageSize is the page size in bytes (Hugepage2Mi or Hugepage1Gi);
	// zero: no hugepages.
	HugepageSize int64
	// HugepageBytes is how much memory comes from hugepages of
	// HugepageSize: a whole number of pages.
	HugepageBytes int64
	// VFs is how many virtual functions the owner gets from each pool.
	VFs map[string]int
}

// Grant is what the pool gave one owner.
type Grant struct {
	Owner string
	// CPUs are the owner's dedicated cores, in ascending order; empty when
	// the request asked for none.
	CPUs []int
	// SharedCPUs is the shared set at the time of the grant: where
	// emulator threads and everything not dedicated runs.
	SharedCPUs []int
	// HugepageDir is a hugetlbfs mount of the requested page size; empty
	// when the request asked for no hugepages.
	HugepageDir string
	// VFs are the owner's virtual functions, bound to vfio-pci.
	VFs []VF
}

// VF is one SR-IOV virtual function held by an owner.
type VF struct {
	// Pool is the configured pool the VF comes from.
	Pool string
	// Address is its PCI address, such as 0000:3b:02.1.
	Address string
	// PreviousDriver is the driver it was bound to before vfio-pci (empty:
	// none); Release binds it back.
	PreviousDriver string
}

// ErrInsufficient is wrapped by the error of a request the pool cannot
// meet; errors.As finds an *InsufficientError naming the resource.
var ErrInsufficient = errors.New("resources: not enough free")

// InsufficientError says which resource a request could not get.
type InsufficientError struct {
	// Resource is the Kubernetes resource name: "cpu", "hugepages-2Mi",
	// "sriov.edge.tether.dev/<pool>".
	Resource string
	// Requested and Free are in the resource's unit (cores, bytes, VFs).
	Requested, Free int64
}

func (e *InsufficientError) Error() string {
	return fmt.Sprintf("resources: %s: requested %d, free %d", e.Resource, e.Requested, e.Free)
}

// Unwrap makes errors.Is(err, ErrInsufficient) hold.
func (e *InsufficientError) Unwrap() error { return ErrInsufficient }
