package chaos

import (
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// applied is one entry of an edge's history: a change it committed (from
// its recorder), or a snapshot of its whole store that the test read.
type applied struct {
	op   byte // 'U' upsert, 'D' delete event, 'P' pruned, 'S' snapshot
	at   time.Time
	key  string
	held held
	snap map[string]held
	src  string
}

// readApplied parses a recorder file. Only lines that end in a newline
// count: a process killed while writing leaves a torn last line, whose
// prefix could read as another version.
func readApplied(path, src string) ([]applied, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	lines := strings.Split(string(b), "\n")
	lines = lines[:len(lines)-1] // "" after the last newline, or the torn line
	var out []applied
	for i, l := range lines {
		fields := strings.Split(l, "\t")
		if len(fields) < 3 || fields[0] == "" {
			continue
		}
		ns, err := strconv.ParseInt(fields[1], 10, 64)
		if err != nil {
			continue
		}
		a := applied{op: fields[0][0], at: time.Unix(0, ns), key: fields[2], src: fmt.Sprintf("%s line %d", src, i+1)}
		switch {
		case a.op == 'U' && len(fields) == 5:
			a.held = held{fields[3], fields[4]}
		case (a.op == 'D' || a.op == 'P') && len(fields) == 3:
		default:
			return nil, fmt.Errorf("%s: line %d is not a change: %q", path, i+1, l)
		}
		out = append(out, a)
	}
	return out, nil
}

// floor is the oldest version a key may still hold, and why.
type floor struct {
	rv  int64
	why string
}

// checkOrder replays an edge's history and returns every time it went
// back: an upsert older than a version the key held before (a stale resend,
// or a deleted object coming back), or an object dropped while the cloud
// still had it.
func checkOrder(node string, history []applied, vers *versions) []string {
	var bad []string
	state := map[string]applied{}
	floors := map[string]floor{}
	upsert := func(a applied) {
		rv, err := strconv.ParseInt(a.held.RV, 10, 64)
		if err != nil {
			bad = append(bad, fmt.Sprintf("%s %s: resourceVersion %q is not an integer (%s)", node, a.key, a.held.RV, a.src))
			return
		}
		if f, ok := floors[a.key]; ok && rv < f.rv {
			bad = append(bad, fmt.Sprintf("%s %s: went back to %s (%s, %s) after %s",
				node, a.key, a.held, a.src, a.at.Format(time.StampMilli), f.why))
		} else {
			floors[a.key] = floor{rv, fmt.Sprintf("it held %s (%s, %s)", a.held, a.src, a.at.Format(time.StampMilli))}
		}
		state[a.key] = a
	}
	remove := func(key string, a applied) {
		prev, ok := state[key]
		if !ok {
			return
		}
		delete(state, key)
		last, deleted := vers.deletedAfter(prev.held.UID)
		if !deleted {
			bad = append(bad, fmt.Sprintf("%s %s: dropped %s (held since %s) at %s (%s) though the cloud never deleted it",
				node, key, prev.held, prev.src, a.at.Format(time.StampMilli), a.src))
			return
		}
		if f := floors[key]; last+1 > f.rv {
			floors[key] = floor{last + 1, fmt.Sprintf("it applied the deletion of %s, whose last version was %d (%s, %s)",
				prev.held.UID, last, a.src, a.at.Format(time.StampMilli))}
		}
	}
	for _, a := range history {
		switch a.op {
		case 'U':
			upsert(a)
		case 'D', 'P':
			remove(a.key, a)
		case 'S':
			for _, k := range slices.Sorted(maps.Keys(state)) {
				if _, ok := a.snap[k]; !ok {
					remove(k, a)
				}
			}
			for _, k := range slices.Sorted(maps.Keys(a.snap)) {
				if prev, ok := state[k]; !ok || prev.held != a.snap[k] {
					upsert(applied{op: 'U', at: a.at, key: k, held: a.snap[k], src: a.src})
				}
			}
		}
	}
	return bad
}

// keyHistory describes what happened to key in an edge's history.
func keyHistory(history []applied, key string) []string {
	var out []string
	for _, a := range history {
		at := a.at.Format("15:04:05.000")
		switch {
		case a.op == 'S':
			if h, ok := a.snap[key]; ok {
				out = append(out, fmt.Sprintf("%s %s: holds %s", at, a.src, h))
			} else {
				out = append(out, fmt.Sprintf("%s %s: absent", at, a.src))
			}
		case a.key != key:
		case a.op == 'U':
			out = append(out, fmt.Sprintf("%s upsert %s (%s)", at, a.held, a.src))
		default:
			out = append(out, fmt.Sprintf("%s %c (%s)", at, a.op, a.src))
		}
	}
	return out
}

// counts sums a history's entries by kind.
func counts(history []applied) string {
	n := map[byte]int{}
	for _, a := range history {
		n[a.op]++
	}
	return fmt.Sprintf("%d upserts, %d deletes, %d pruned, %d snapshots", n['U'], n['D'], n['P'], n['S'])
}
