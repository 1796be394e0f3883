// Package configfile is the machinery of the daemons' versioned YAML
// config files (apiVersion config.tether.dev/v1alpha1): strict loading
// that names the field of every error, command-line flags bound to the
// same fields, and the commented default file and the docs reference
// rendered from the fields' doc tags. It knows no daemon: each one's types
// and defaults live in its own config package (cloudcore/config,
// edgecore/config), and it holds no secret (join tokens stay out of
// config files).
//
// A configuration is a struct of groups (structs) of leaves. A leaf field
// carries three tags, the one place that describes it:
//
//	KeepAlive configfile.Duration `json:"keepAlive" flag:"keepalive" doc:"keepalive interval"`
//
// json is its name in the file, flag the command-line flag that overrides
// it (",array" after the name: a repeatable flag whose values may hold
// commas), doc its description for --help, the default file and the
// reference. A group field has json and doc tags only. Supported leaves:
// string, bool, int, float32, float64, []string and Duration.
package configfile

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"reflect"
	"slices"
	"strings"
	"time"

	"sigs.k8s.io/yaml"
)

// APIVersion is the only version of the config files.
const APIVersion = "config.tether.dev/v1alpha1"

// maxFile bounds what Load reads: a config file is a few KiB.
const maxFile = 1 << 20

// TypeMeta is the apiVersion and kind every file starts with.
type TypeMeta struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
}

// Duration is a time.Duration written as a string in the file ("15s",
// "24h"), as Kubernetes' metav1.Duration is.
type Duration struct{ time.Duration }

// MarshalJSON writes d as a duration string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(d.Duration.String()) }

// UnmarshalJSON reads a duration string.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return errors.New(`want a duration string such as "15s"`)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf(`want a duration such as "15s": %w`, err)
	}
	d.Duration = v
	return nil
}

// Set parses a flag value; with String and Type it makes *Duration a
// pflag.Value.
func (d *Duration) Set(s string) error {
	v, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	d.Duration = v
	return nil
}

// Type names the flag's value in --help.
func (d *Duration) Type() string { return "duration" }

var durationType = reflect.TypeFor[Duration]()

// Load reads the file at path into cfg, which holds the defaults: what the
// file names replaces them, what it leaves out keeps them. cfg must be a
// pointer to a struct that embeds TypeMeta; kind is the kind the file
// must have. Unknown fields, a wrong type, a missing or other apiVersion
// or kind are refused with an error naming the field, and cfg is left as
// it was.
func Load(path, kind string, cfg any) error {
	b, err := readFile(path)
	if err != nil {
		return err
	}
	if err := Decode(b, kind, cfg); err != nil {
		return fmt.Errorf("config file %s: %w", path, err)
	}
	return nil
}

func readFile(path string) ([]byte, error) {
	fh, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open config file %s: %w", path, pathless(err))
	}
	defer fh.Close()
	b, err := io.ReadAll(io.LimitReader(fh, maxFile+1))
	if err != nil {
		return nil, fmt.Errorf("read config file %s: %w", path, pathless(err))
	}
	if len(b) > maxFile {
		return nil, fmt.Errorf("config file %s is larger than %d bytes", path, maxFile)
	}
	return b, nil
}

// pathless returns the reason of an os error without its "open PATH: "
// prefix, which the caller's message already says.
func pathless(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// Decode is Load of the bytes of a file.
func Decode(b []byte, kind string, cfg any) error {
	v := reflect.ValueOf(cfg)
	if v.Kind() != reflect.Pointer || v.Elem().Kind() != reflect.Struct {
		return fmt.Errorf("configfile: decode into %T: want a pointer to a struct", cfg)
	}
	js, err := yaml.YAMLToJSONStrict(b)
	if err != nil {
		return fmt.Errorf("parse YAML: %w", err)
	}
	var top map[string]json.RawMessage
	if err := json.Unmarshal(js, &top); err != nil || top == nil {
		return errors.New("want a YAML mapping with apiVersion and kind")
	}
	for name, want := range map[string]string{"apiVersion": APIVersion, "kind": kind} {
		raw, ok := top[name]
		var got string
		if ok {
			_ = json.Unmarshal(raw, &got)
		}
		if got != want {
			return fmt.Errorf("%s: want %s, got %q", name, want, got)
		}
	}
	// Decoded into a copy, so that a refused file changes nothing.
	out := reflect.New(v.Elem().Type())
	out.Elem().Set(v.Elem())
	if err := decodeStruct("", js, out.Elem()); err != nil {
		return err
	}
	v.Elem().Set(out.Elem())
	return nil
}

// decodeStruct decodes the JSON object raw into the struct v, field by
// field, so that each error names its path.
func decodeStruct(path string, raw json.RawMessage, v reflect.Value) error {
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(raw, &obj); err != nil {
		return fmt.Errorf("%s: want a mapping", strings.TrimSuffix(path, "."))
	}
	fields := fieldsByName(v.Type())
	for _, name := range slices.Sorted(maps.Keys(obj)) {
		idx, ok := fields[name]
		if !ok {
			return fmt.Errorf("%s%s: unknown field", path, name)
		}
		f := v.FieldByIndex(idx)
		if string(obj[name]) == "null" {
			f.SetZero()
			continue
		}
		if isGroup(f.Type()) {
			if err := decodeStruct(path+name+".", obj[name], f); err != nil {
				return err
			}
			continue
		}
		if err := json.Unmarshal(obj[name], f.Addr().Interface()); err != nil {
			return fmt.Errorf("%s%s: %s", path, name, leafError(err))
		}
		if f.Kind() == reflect.Slice && f.Len() == 0 {
			// "[]" is the default file's way of writing none.
			f.SetZero()
		}
	}
	return nil
}

// leafError says what was wrong with a leaf's value, without the JSON
// decoder's Go type names.
func leafError(err error) string {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		return fmt.Sprintf("want %s, got a %s", kindName(te.Type), te.Value)
	}
	return err.Error()
}

func kindName(t reflect.Type) string {
	switch t.Kind() {
	case reflect.Bool:
		return "true or false"
	case reflect.Int, reflect.Int64, reflect.Int32:
		return "an integer"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.Slice:
		return "a list"
	case reflect.String:
		return "a string"
	}
	return t.String()
}

// isGroup says whether t is a group of fields rather than a leaf.
func isGroup(t reflect.Type) bool { return t.Kind() == reflect.Struct && t != durationType }

// fieldsByName maps the JSON names of t's fields (those of embedded
// structs included) to their index.
func fieldsByName(t reflect.Type) map[string][]int {
	out := map[string][]int{}
	for _, f := range reflect.VisibleFields(t) {
		if f.Anonymous || !f.IsExported() {
			continue
		}
		if name := jsonName(f); name != "" {
			out[name] = f.Index
		}
	}
	return out
}

func jsonName(f reflect.StructField) string {
	name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
	if name == "-" {
		return ""
	}
	return name
}

// ParseLevel parses a log level field: debug, info, warn or error.
func ParseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return 0, fmt.Errorf("log level %q: want debug, info, warn or error", s)
	}
	return l, nil
}
