package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// pin sets the CPU affinity of QEMU's threads: vCPU i's thread to
// DedicatedCPUs[i], every other thread (and the vCPUs when DedicatedCPUs
// is empty) to SharedCPUs. Threads QEMU starts later inherit the main
// thread's mask, which is the shared set. Nothing to do when both are
// empty.
func (m *Machine) pin(ctx context.Context) error {
	if len(m.spec.DedicatedCPUs) == 0 && len(m.spec.SharedCPUs) == 0 {
		return nil
	}
	vcpus, err := m.VCPUThreads(ctx)
	if err != nil {
		return err
	}
	if len(m.spec.DedicatedCPUs) != 0 && len(vcpus) != len(m.spec.DedicatedCPUs) {
		return fmt.Errorf("pin vcpus: qemu has %d vcpu threads, the spec %d dedicated cpus", len(vcpus), len(m.spec.DedicatedCPUs))
	}
	isVCPU := make(map[int]int, len(vcpus))
	for i, tid := range vcpus {
		isVCPU[tid] = i
	}
	if len(m.spec.DedicatedCPUs) != 0 {
		seen := map[int]bool{}
		for i, tid := range vcpus {
			if seen[tid] {
				return fmt.Errorf("pin vcpus: vcpus share thread %d (single-threaded tcg?)", tid)
			}
			seen[tid] = true
			if err := setAffinity(tid, []int{m.spec.DedicatedCPUs[i]}); err != nil {
				return fmt.Errorf("pin vcpu %d: %w", i, err)
			}
		}
	}
	if len(m.spec.SharedCPUs) == 0 {
		return nil
	}
	tids, err := Threads(m.pid)
	if err != nil {
		return err
	}
	for _, tid := range tids {
		if _, ok := isVCPU[tid]; ok && len(m.spec.DedicatedCPUs) != 0 {
			continue
		}
		if err := setAffinity(tid, m.spec.SharedCPUs); err != nil && !errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("pin emulator thread %d: %w", tid, err)
		}
	}
	return nil
}

// setAffinity is sched_setaffinity(2) on one thread.
func setAffinity(tid int, cpus []int) error {
	var set unix.CPUSet
	for _, c := range cpus {
		set.Set(c)
	}
	if err := unix.SchedSetaffinity(tid, &set); err != nil {
		return fmt.Errorf("set affinity of thread %d to %v: %w", tid, cpus, err)
	}
	return nil
}

// Threads lists the thread ids of process pid (/proc/PID/task).
func Threads(pid int) ([]int, error) {
	ents, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/task")
	if err != nil {
		return nil, fmt.Errorf("list threads of %d: %w", pid, err)
	}
	tids := make([]int, 0, len(ents))
	for _, e := range ents {
		if tid, err := strconv.Atoi(e.Name()); err == nil {
			tids = append(tids, tid)
		}
	}
	return tids, nil
}
