package hostinfo

import (
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

func TestParseCPUList(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int
		bad  bool
	}{
		{in: "0", want: 1},
		{in: "0-1\n", want: 2},
		{in: "0-3,8,10-11", want: 7},
		{in: "", bad: true},
		{in: "0-", bad: true},
		{in: "3-1", bad: true},
		{in: "a", bad: true},
		{in: "-1", bad: true},
		{in: "0,,1", bad: true},
	} {
		t.Run(tc.in, func(t *testing.T) {
			n, err := ParseCPUList(tc.in)
			if tc.bad {
				require.Error(t, err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.want, n)
		})
	}
}

func TestCountProcessors(t *testing.T) {
	in := "processor\t: 0\nmodel name\t: X\n\nprocessor\t: 1\nflags : processor\n"
	require.Equal(t, 2, CountProcessors(strings.NewReader(in)))
	require.Equal(t, 0, CountProcessors(strings.NewReader("")))
}

func TestParseMemTotal(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     int64
		bad      bool
	}{
		{name: "real", in: "MemTotal:        8029820 kB\nMemFree:  1 kB\n", want: 8029820 * 1024},
		{name: "not first", in: "MemFree: 1 kB\nMemTotal: 2 kB\n", want: 2048},
		{name: "missing", in: "MemFree: 1 kB\n", bad: true},
		{name: "not a number", in: "MemTotal: x kB\n", bad: true},
		{name: "zero", in: "MemTotal: 0 kB\n", bad: true},
		{name: "other unit", in: "MemTotal: 5 MB\n", bad: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n, err := ParseMemTotal(strings.NewReader(tc.in))
			if tc.bad {
				require.Error(t, err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.want, n)
		})
	}
}

func TestParseOSRelease(t *testing.T) {
	for _, tc := range []struct{ name, in, want string }{
		{name: "debian", in: "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 13 (trixie)\"\n", want: "Debian GNU/Linux 13 (trixie)"},
		{name: "unquoted", in: "PRETTY_NAME=Alpine\n", want: "Alpine"},
		{name: "single quotes", in: "PRETTY_NAME='A B'\n", want: "A B"},
		{name: "escapes", in: `PRETTY_NAME="say \"hi\" \$x"` + "\n", want: `say "hi" $x`},
		{name: "absent", in: "NAME=x\n", want: ""},
		{name: "prefix only", in: "PRETTY_NAMES=x\n", want: ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.want, ParseOSRelease(strings.NewReader(tc.in)))
		})
	}
}

func TestParseHugePageSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		bad  bool
	}{
		{in: "hugepages-2048kB", want: 2 << 20},
		{in: "hugepages-1048576kB", want: 1 << 30},
		{in: "hugepages-2048", bad: true},
		{in: "2048kB", bad: true},
		{in: "hugepages-0kB", bad: true},
		{in: "hugepages-xkB", bad: true},
	} {
		t.Run(tc.in, func(t *testing.T) {
			n, err := ParseHugePageSize(tc.in)
			if tc.bad {
				require.Error(t, err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.want, n)
		})
	}
}

// writeTree writes files (path relative to root -> content) below a new
// root directory.
func writeTree(t *testing.T, files map[string]string) string {
	root := t.TempDir()
	for p, content := range files {
		full := filepath.Join(root, p)
		require.NoError(t, os.MkdirAll(filepath.Dir(full), 0o755))
		require.NoError(t, os.WriteFile(full, []byte(content), 0o644))
	}
	return root
}

// host is a synthetic host with every file Read looks at.
func host() map[string]string {
	return map[string]string{
		"sys/devices/system/cpu/online": "0-5\n",
		"proc/cpuinfo":                  "processor : 0\n",
		"proc/meminfo":                  "MemTotal: 16384000 kB\n",
		"sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages":    "512\n",
		"sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages": "0\n",
		"proc/sys/kernel/osrelease":                                "6.12.0-1-amd64\n",
		"etc/os-release":                                           "PRETTY_NAME=\"Debian GNU/Linux 13 (trixie)\"\n",
		"usr/lib/os-release":                                       "PRETTY_NAME=\"not this one\"\n",
		"etc/machine-id":                                           "3d1219c7c4c5404aaa1f6d2a48adfda4\n",
		"sys/class/dmi/id/product_uuid":                            "4c4c4544-0042-3510-8052-b4c04f384d32\n",
		"proc/sys/kernel/random/boot_id":                           "a6b4ef2e-2d7a-4a8e-9a3b-0c1f6b5d2e11\n",
	}
}

func TestReadSyntheticHost(t *testing.T) {
	f, err := Read(writeTree(t, host()))
	require.NoError(t, err)
	require.Equal(t, Facts{
		CPUs: 6, MemoryBytes: 16384000 * 1024,
		HugePages:     map[int64]int64{2 << 20: 512 * 2 << 20, 1 << 30: 0},
		KernelVersion: "6.12.0-1-amd64", OSImage: "Debian GNU/Linux 13 (trixie)",
		MachineID: "3d1219c7c4c5404aaa1f6d2a48adfda4", SystemUUID: "4c4c4544-0042-3510-8052-b4c04f384d32",
		BootID: "a6b4ef2e-2d7a-4a8e-9a3b-0c1f6b5d2e11",
	}, f)
}

func TestReadFallbacksAndErrors(t *testing.T) {
	t.Run("cpuinfo without online list, no optional files", func(t *testing.T) {
		files := map[string]string{
			"proc/cpuinfo":              "processor : 0\nprocessor : 1\nprocessor : 2\n",
			"proc/meminfo":              "MemTotal: 1024 kB\n",
			"proc/sys/kernel/osrelease": "6.1.0\n",
			"usr/lib/os-release":        "PRETTY_NAME=Fallback\n",
		}
		f, err := Read(writeTree(t, files))
		require.NoError(t, err)
		require.Equal(t, Facts{CPUs: 3, MemoryBytes: 1 << 20, HugePages: map[int64]int64{}, KernelVersion: "6.1.0", OSImage: "Fallback"}, f)
	})
	t.Run("nothing names the OS", func(t *testing.T) {
		files := host()
		delete(files, "etc/os-release")
		delete(files, "usr/lib/os-release")
		f, err := Read(writeTree(t, files))
		require.NoError(t, err)
		require.Equal(t, "Linux", f.OSImage)
	})
	t.Run("required facts missing", func(t *testing.T) {
		f, err := Read(t.TempDir())
		require.ErrorContains(t, err, "read memory")
		require.ErrorContains(t, err, "read kernel version")
		require.Equal(t, int64(runtime.NumCPU()), f.CPUs, "no online list and no cpuinfo: the Go runtime's count")
	})
	t.Run("bad files", func(t *testing.T) {
		files := host()
		files["sys/devices/system/cpu/online"] = "zero\n"
		files["proc/meminfo"] = "MemTotal: lots kB\n"
		files["sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"] = "-1\n"
		_, err := Read(writeTree(t, files))
		require.ErrorContains(t, err, "read online cpus")
		require.ErrorContains(t, err, "parse MemTotal")
		require.ErrorContains(t, err, "bad nr_hugepages")
	})
}

// TestReadLiveHost checks Read against what this machine says through
// other means: the Go runtime's CPU count (the test machine's affinity
// mask is all online CPUs), sysinfo's total RAM and uname's release.
func TestReadLiveHost(t *testing.T) {
	f, err := Read("/")
	require.NoError(t, err)
	require.Equal(t, int64(runtime.NumCPU()), f.CPUs)
	var si unix.Sysinfo_t
	require.NoError(t, unix.Sysinfo(&si))
	require.Equal(t, int64(si.Totalram)*int64(si.Unit), f.MemoryBytes) //nolint:gosec // RAM fits in int64
	var u unix.Utsname
	require.NoError(t, unix.Uname(&u))
	require.Equal(t, unix.ByteSliceToString(u.Release[:]), f.KernelVersion)
	require.NotEmpty(t, f.BootID)

	size, err := StorageBytes(t.TempDir())
	require.NoError(t, err)
	require.Positive(t, size)
	_, err = StorageBytes(filepath.Join(t.TempDir(), "absent"))
	require.Error(t, err)
}
