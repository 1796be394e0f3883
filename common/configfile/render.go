package configfile

import (
	"encoding/json"
	"fmt"
	"os"
	"reflect"
	"strings"
)

// Render returns cfg (a struct, or a pointer to one, that embeds
// TypeMeta) as a YAML file with every field's doc tag as a comment above
// it and its flag named: the file `config default` prints. header is
// written first as comment lines. Values are written as JSON, which is
// YAML, so that no string is read back as another type.
func Render(cfg any, header string) []byte {
	v := reflect.Indirect(reflect.ValueOf(cfg))
	var b strings.Builder
	comment(&b, "", header)
	tm := v.FieldByName("TypeMeta").Interface().(TypeMeta)
	fmt.Fprintf(&b, "apiVersion: %s\nkind: %s\n", tm.APIVersion, tm.Kind)
	renderStruct(&b, v, "")
	return []byte(b.String())
}

func renderStruct(b *strings.Builder, v reflect.Value, indent string) {
	t := v.Type()
	first := true
	for i := range t.NumField() {
		sf := t.Field(i)
		name := jsonName(sf)
		if sf.Anonymous || !sf.IsExported() || name == "" {
			continue
		}
		if indent == "" || !first {
			b.WriteString("\n")
		}
		first = false
		doc := sf.Tag.Get("doc")
		if fl, _, _ := strings.Cut(sf.Tag.Get("flag"), ","); fl != "" {
			doc += " Flag --" + fl + "."
		}
		comment(b, indent, doc)
		if isGroup(sf.Type) {
			fmt.Fprintf(b, "%s%s:\n", indent, name)
			renderStruct(b, v.Field(i), indent+"  ")
			continue
		}
		fmt.Fprintf(b, "%s%s: %s\n", indent, name, leafValue(v.Field(i)))
	}
}

// leafValue is a leaf's value as JSON; no list is written as [].
func leafValue(v reflect.Value) string {
	if v.Kind() == reflect.Slice && v.Len() == 0 {
		return "[]"
	}
	js, err := json.Marshal(v.Interface())
	if err != nil {
		// The leaf types (see the package comment) all marshal.
		panic(fmt.Sprintf("configfile: marshal %s: %v", v.Type(), err))
	}
	return string(js)
}

// comment writes text as comment lines of at most about 76 columns.
func comment(b *strings.Builder, indent, text string) {
	for para := range strings.SplitSeq(strings.TrimSpace(text), "\n") {
		line := indent + "#"
		for _, w := range strings.Fields(para) {
			if len(line)+1+len(w) > 76 && len(line) > len(indent)+1 {
				b.WriteString(line + "\n")
				line = indent + "#"
			}
			line += " " + w
		}
		b.WriteString(line + "\n")
	}
}

// Reference returns cfg's fields as a Markdown table (field, flag,
// default, meaning), groups as headed rows: the config reference in
// docs/operations.md, which a test keeps equal to it.
func Reference(cfg any) string {
	v := reflect.Indirect(reflect.ValueOf(cfg))
	var b strings.Builder
	b.WriteString("| field | flag | default | meaning |\n|---|---|---|---|\n")
	fmt.Fprintf(&b, "| `apiVersion` | | `%s` | the file's version: required |\n", APIVersion)
	fmt.Fprintf(&b, "| `kind` | | `%s` | required |\n", v.FieldByName("TypeMeta").Interface().(TypeMeta).Kind)
	t := v.Type()
	for _, lf := range leaves(t) {
		fl := ""
		if lf.flag != "" {
			fl = "`--" + lf.flag + "`"
		}
		doc := strings.ReplaceAll(strings.Join(strings.Fields(lf.doc), " "), "|", `\|`)
		fmt.Fprintf(&b, "| `%s` | %s | `%s` | %s |\n", lf.path, fl, leafValue(v.FieldByIndex(lf.index)), doc)
	}
	return b.String()
}

// Section returns the text of doc between the lines
// "<!-- BEGIN name -->" and "<!-- END name -->", where a reference is kept
// in a Markdown file, and the offsets of that text.
func Section(doc, name string) (text string, start, end int, err error) {
	begin, stop := "<!-- BEGIN "+name+" -->\n", "<!-- END "+name+" -->"
	i := strings.Index(doc, begin)
	j := strings.Index(doc, stop)
	if i < 0 || j < i+len(begin) {
		return "", 0, 0, fmt.Errorf("no %q ... %q section", strings.TrimSpace(begin), stop)
	}
	return doc[i+len(begin) : j], i + len(begin), j, nil
}

// CheckSection reports whether the section name of the Markdown file at
// path (see Section) is want; with update it rewrites the section to want
// instead. The docs tests of the daemons' config packages use it.
func CheckSection(path, name, want string, update bool) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("read docs: %w", err)
	}
	got, start, end, err := Section(string(b), name)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if got == want {
		return nil
	}
	if update {
		if err := os.WriteFile(path, []byte(string(b[:start])+want+string(b[end:])), 0o644); err != nil {
			return fmt.Errorf("update docs: %w", err)
		}
		return nil
	}
	return fmt.Errorf("the %s in %s disagrees with the source (TETHER_UPDATE_DOCS=1 go test rewrites it); it should be:\n%s", name, path, want)
}
