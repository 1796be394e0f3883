package vm

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/tetheredge/tether/edgecore/resources"
	"github.com/tetheredge/tether/edgecore/runtime/vm/qemu"
	"github.com/tetheredge/tether/edgecore/store"
)

// A VM's record is one row of the store's allocation table: kind "vm",
// item and owner the sandbox id, detail the JSON of record. It is written
// at every change of state (sandbox run and stopped, container created,
// started and exited, guest booted), in the same transaction as the
// hugepage bytes the backend accounts itself when no resource pool is
// configured, and it is what New reads to adopt the QEMUs that still run.

// KindVM is the allocation kind of VM records.
const KindVM = "vm"

// Allocations is the part of the store's allocation table the backend
// uses; store.Allocations implements it.
type Allocations interface {
	Claim(ctx context.Context, owner string, rows []store.Allocation, limits map[string]int64) error
	Release(ctx context.Context, owner string) error
	Kind(ctx context.Context, kind string) ([]store.Allocation, error)
}

// Sandbox and container states, as records keep them.
const (
	stateReady    = "ready"
	stateNotReady = "notready"

	stateCreated = "created"
	stateRunning = "running"
	stateExited  = "exited"
)

// record is what the backend knows of one VM sandbox.
type record struct {
	ID          string            `json:"id"`
	Name        string            `json:"name"`
	Namespace   string            `json:"namespace"`
	UID         string            `json:"uid"`
	Attempt     uint32            `json:"attempt"`
	Labels      map[string]string `json:"labels,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
	LogDir      string            `json:"logDir"`
	CreatedAt   int64             `json:"createdAt"`
	State       string            `json:"state"`
	Params      params            `json:"params"`
	// Dir is the sandbox's runtime directory: the overlay, the QMP socket,
	// the user data.
	Dir string `json:"dir"`
	// Overlay is the VM's disk, made by the first CreateContainer and kept
	// until RemovePodSandbox: a restarted container is a rebooted guest,
	// and its disk must survive.
	Overlay string `json:"overlay,omitempty"`
	// Image is the base image the overlay backs onto: it cannot be
	// removed while the sandbox exists.
	Image string `json:"image,omitempty"`
	// Grant is what the resource pool gave (nil: no pool, or released).
	Grant *resources.Grant `json:"grant,omitempty"`
	// HugepageDir and HugepageBytes are the backend's own hugepage
	// accounting, without a pool; HugepageBytes is 0 once released.
	HugepageDir   string `json:"hugepageDir,omitempty"`
	HugepageBytes int64  `json:"hugepageBytes,omitempty"`
	// Containers are the sandbox's containers, oldest first; at most one
	// is not exited.
	Containers []*container `json:"containers,omitempty"`
}

// container is one instance of the guest: one QEMU run.
type container struct {
	ID          string            `json:"id"`
	Name        string            `json:"name"`
	Attempt     uint32            `json:"attempt"`
	Image       string            `json:"image"`
	ImageRef    string            `json:"imageRef"`
	Labels      map[string]string `json:"labels,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
	// LogPath is the CRI log path; the serial console (Spec.SerialLog, a
	// raw file of the sandbox directory) is converted into it (console.go).
	LogPath    string `json:"logPath"`
	State      string `json:"state"`
	CreatedAt  int64  `json:"createdAt"`
	StartedAt  int64  `json:"startedAt,omitempty"`
	FinishedAt int64  `json:"finishedAt,omitempty"`
	ExitCode   int32  `json:"exitCode,omitempty"`
	Reason     string `json:"reason,omitempty"`
	Message    string `json:"message,omitempty"`
	// Spec is the QEMU the container runs, kept for Attach.
	Spec qemu.Spec `json:"spec"`
	Pid  int       `json:"pid,omitempty"`
	// BootedAt is when the boot marker was seen on the console (0: not
	// yet); Console is the console's tail at the last change of state.
	BootedAt int64  `json:"bootedAt,omitempty"`
	Console  string `json:"console,omitempty"`
}

// live is the container that is not exited, or nil.
func (r *record) live() *container {
	for _, c := range r.Containers {
		if c.State != stateExited {
			return c
		}
	}
	return nil
}

func (r *record) container(id string) *container {
	for _, c := range r.Containers {
		if c.ID == id {
			return c
		}
	}
	return nil
}

// rows are the allocation rows of r: its record, and its hugepage bytes
// when the backend accounts them itself.
func (r *record) rows() ([]store.Allocation, error) {
	data, err := json.Marshal(r)
	if err != nil {
		return nil, fmt.Errorf("encode vm record: %w", err)
	}
	rows := []store.Allocation{{Kind: KindVM, Item: r.ID, Detail: data}}
	if r.HugepageDir != "" {
		rows = append(rows, store.Allocation{Kind: hugepageKind(r.Params.HugepageSize), Item: r.ID, Amount: r.HugepageBytes})
	}
	return rows, nil
}

// loadRecords reads every VM record. A record that does not decode is
// returned in bad, not as an error: it must not keep the other VMs from
// being adopted.
func loadRecords(ctx context.Context, a Allocations) (recs []*record, bad []error, err error) {
	rows, err := a.Kind(ctx, KindVM)
	if err != nil {
		return nil, nil, err
	}
	for _, row := range rows {
		var r record
		if err := json.Unmarshal(row.Detail, &r); err != nil {
			bad = append(bad, fmt.Errorf("decode vm record %s: %w", row.Item, err))
			continue
		}
		if r.ID != row.Item || row.Owner != row.Item {
			bad = append(bad, fmt.Errorf("decode vm record %s: it names sandbox %q, owner %q", row.Item, r.ID, row.Owner))
			continue
		}
		recs = append(recs, &r)
	}
	return recs, bad, nil
}
