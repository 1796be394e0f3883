package hollow

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// clockTicks is USER_HZ, the unit of /proc/PID/stat's times (100 on
// every Linux this runs on).
const clockTicks = 100

// cpuSeconds returns the user and system CPU time process pid used so
// far, in seconds ("self" for this process).
func cpuSeconds(pid string) (float64, error) {
	b, err := os.ReadFile(filepath.Join("/proc", pid, "stat"))
	if err != nil {
		return 0, fmt.Errorf("read the CPU time of %s: %w", pid, err)
	}
	// The command name (field 2) may hold spaces: count from after it.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("read the CPU time of %s: no command name", pid)
	}
	f := strings.Fields(s[i+1:])
	// Fields 14 (utime) and 15 (stime) of the whole line are 11 and 12
	// after the name.
	if len(f) < 13 {
		return 0, fmt.Errorf("read the CPU time of %s: %d fields", pid, len(f))
	}
	var total float64
	for _, v := range f[11:13] {
		n, err := strconv.ParseFloat(v, 64)
		if err != nil {
			return 0, fmt.Errorf("read the CPU time of %s: %w", pid, err)
		}
		total += n
	}
	return total / clockTicks, nil
}

// runDelay returns how long the threads of process pid have waited, in
// all, for a CPU while runnable (the second field of each thread's
// schedstat), in seconds: on a shared machine, how much the process was
// starved.
func runDelay(pid int) (float64, error) {
	tasks, err := filepath.Glob(filepath.Join("/proc", strconv.Itoa(pid), "task", "*", "schedstat"))
	if err != nil {
		return 0, fmt.Errorf("list the threads of %d: %w", pid, err)
	}
	if len(tasks) == 0 {
		return 0, fmt.Errorf("list the threads of %d: no such process", pid)
	}
	var ns float64
	for _, t := range tasks {
		b, err := os.ReadFile(t)
		if err != nil {
			continue // the thread ended meanwhile
		}
		if f := strings.Fields(string(b)); len(f) >= 2 {
			v, _ := strconv.ParseFloat(f[1], 64)
			ns += v
		}
	}
	return ns / 1e9, nil
}
