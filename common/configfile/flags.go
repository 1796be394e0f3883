package configfile

import (
	"fmt"
	"reflect"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// Flags are the command-line flags bound to a configuration's leaves, one
// flag set per group for --help. Parsing them writes into the struct Bind
// was given; Apply copies the flags the user set onto a loaded
// configuration, so that they override the file and the others do not.
type Flags struct {
	src    reflect.Value
	fields map[string][]int // flag name -> field index
	groups []group
}

type group struct {
	title string
	set   *pflag.FlagSet
}

// Bind registers a flag on into for every leaf of cfg (a pointer to a
// struct holding the defaults) that has a flag tag, with cfg's values as
// the flags' defaults. With inFile each flag's help names the field it
// overrides (cfg is a whole file's configuration). It fails on a leaf of a type it cannot bind, or a
// flag name given twice: both are mistakes in the configuration's type.
func Bind(cfg any, into *pflag.FlagSet, inFile bool) (*Flags, error) {
	v := reflect.ValueOf(cfg)
	if v.Kind() != reflect.Pointer || v.Elem().Kind() != reflect.Struct {
		return nil, fmt.Errorf("configfile: bind %T: want a pointer to a struct", cfg)
	}
	f := &Flags{src: v.Elem(), fields: map[string][]int{}}
	general := group{title: "General", set: newSet("general")}
	for _, lf := range leaves(v.Elem().Type()) {
		if lf.flag == "" {
			continue
		}
		set := general.set
		if lf.group != "" {
			if len(f.groups) == 0 || f.groups[len(f.groups)-1].title != lf.group {
				f.groups = append(f.groups, group{title: lf.group, set: newSet(lf.group)})
			}
			set = f.groups[len(f.groups)-1].set
		}
		if _, dup := f.fields[lf.flag]; dup || into.Lookup(lf.flag) != nil {
			return nil, fmt.Errorf("configfile: flag --%s bound twice", lf.flag)
		}
		usage := lf.doc
		if inFile {
			usage = fmt.Sprintf("%s (file: %s)", lf.doc, lf.path)
		}
		if err := bindLeaf(set, v.Elem().FieldByIndex(lf.index), lf.flag, lf.array, usage); err != nil {
			return nil, fmt.Errorf("configfile: field %s: %w", lf.path, err)
		}
		f.fields[lf.flag] = lf.index
	}
	if general.set.HasFlags() {
		f.groups = append([]group{general}, f.groups...)
	}
	for _, g := range f.groups {
		into.AddFlagSet(g.set)
	}
	return f, nil
}

// newSet is a group's flag set, listed in the order of its fields.
func newSet(name string) *pflag.FlagSet {
	s := pflag.NewFlagSet(name, pflag.ContinueOnError)
	s.SortFlags = false
	return s
}

func bindLeaf(set *pflag.FlagSet, fv reflect.Value, name string, array bool, usage string) error {
	switch p := fv.Addr().Interface().(type) {
	case *string:
		set.StringVar(p, name, *p, usage)
	case *bool:
		set.BoolVar(p, name, *p, usage)
	case *int:
		set.IntVar(p, name, *p, usage)
	case *float32:
		set.Float32Var(p, name, *p, usage)
	case *float64:
		set.Float64Var(p, name, *p, usage)
	case *[]string:
		if array {
			set.StringArrayVar(p, name, *p, usage)
		} else {
			set.StringSliceVar(p, name, *p, usage)
		}
	case *Duration:
		set.Var(p, name, usage)
	default:
		return fmt.Errorf("cannot bind a flag to a %s", fv.Type())
	}
	return nil
}

// Apply copies onto dst (a pointer to the same type Bind was given) the
// value of every flag that was set on the command line, as cobra's
// Changed says: flags override the file, defaults do not.
func (f *Flags) Apply(dst any) {
	d := reflect.ValueOf(dst).Elem()
	for _, g := range f.groups {
		g.set.VisitAll(func(fl *pflag.Flag) {
			if !fl.Changed {
				return
			}
			idx := f.fields[fl.Name]
			d.FieldByIndex(idx).Set(f.src.FieldByIndex(idx))
		})
	}
}

// SetUsage makes cmd's --help list its flags by group, in the order of
// the configuration's fields, then the flags Bind did not make (such as
// --config) under "Other flags". Subcommands keep cobra's usage.
func (f *Flags) SetUsage(cmd *cobra.Command) {
	fallback := (&cobra.Command{}).UsageFunc()
	cmd.SetUsageFunc(func(c *cobra.Command) error {
		if c != cmd {
			return fallback(c)
		}
		var b strings.Builder
		fmt.Fprintf(&b, "Usage:\n  %s [flags]\n", c.CommandPath())
		if c.HasAvailableSubCommands() {
			fmt.Fprintf(&b, "  %s [command]\n\nAvailable Commands:\n", c.CommandPath())
			for _, sub := range c.Commands() {
				if sub.IsAvailableCommand() || sub.Name() == "help" {
					fmt.Fprintf(&b, "  %-*s %s\n", sub.NamePadding(), sub.Name(), sub.Short)
				}
			}
		}
		for _, g := range f.groups {
			fmt.Fprintf(&b, "\n%s flags:\n%s", g.title, g.set.FlagUsages())
		}
		other := pflag.NewFlagSet("other", pflag.ContinueOnError)
		c.LocalFlags().VisitAll(func(fl *pflag.Flag) {
			if _, ours := f.fields[fl.Name]; !ours {
				other.AddFlag(fl)
			}
		})
		if other.HasFlags() {
			fmt.Fprintf(&b, "\nOther flags:\n%s", other.FlagUsages())
		}
		if c.HasAvailableSubCommands() {
			fmt.Fprintf(&b, "\nUse \"%s [command] --help\" for more information about a command.\n", c.CommandPath())
		}
		_, err := fmt.Fprint(c.OutOrStderr(), b.String())
		return err
	})
}

// leaf is one leaf field of a configuration.
type leaf struct {
	path  string // in the file: tunnel.keepAlive
	index []int
	flag  string
	array bool
	doc   string
	group string // the title of its group; "" at the top level
}

// leaves lists t's leaves in field order, apiVersion and kind left out.
func leaves(t reflect.Type) []leaf {
	var out []leaf
	var walk func(t reflect.Type, prefix string, index []int, title string)
	walk = func(t reflect.Type, prefix string, index []int, title string) {
		for i := range t.NumField() {
			sf := t.Field(i)
			idx := append(append([]int{}, index...), i)
			if sf.Anonymous || !sf.IsExported() {
				continue
			}
			name := jsonName(sf)
			if name == "" {
				continue
			}
			if isGroup(sf.Type) {
				walk(sf.Type, prefix+name+".", idx, sf.Tag.Get("title"))
				continue
			}
			fl, opt, _ := strings.Cut(sf.Tag.Get("flag"), ",")
			out = append(out, leaf{path: prefix + name, index: idx, flag: fl, array: opt == "array", doc: sf.Tag.Get("doc"), group: title})
		}
	}
	walk(t, "", nil, "")
	return out
}
