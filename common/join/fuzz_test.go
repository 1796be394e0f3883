package join

import (
	"errors"
	"strings"
	"testing"
)

// FuzzParse feeds the token parser what the join endpoint receives from
// anyone: it must never panic, must refuse with ErrBadToken, and what it
// accepts must be a token in the documented format that prints and parses
// back to itself.
func FuzzParse(f *testing.F) {
	f.Add("tj1.abcdefgh.abcdefghijklmnopqrstuvwxyz." + strings.Repeat("0a", 32))
	f.Fuzz(func(t *testing.T, s string) {
		tok, err := Parse(s)
		if err != nil {
			if !errors.Is(err, ErrBadToken) {
				t.Fatalf("Parse(%q): error %v does not wrap ErrBadToken", s, err)
			}
			return
		}
		if len(tok.ID) != idLen || !isB32(tok.ID) || len(tok.Secret) != secretLen || !isB32(tok.Secret) {
			t.Fatalf("Parse(%q) accepted id %q, secret %q", s, tok.ID, tok.Secret)
		}
		if len(tok.CAHash) != 64 || strings.ToLower(tok.CAHash) != tok.CAHash {
			t.Fatalf("Parse(%q) accepted CA hash %q", s, tok.CAHash)
		}
		again, err := Parse(tok.String())
		if err != nil || again != tok {
			t.Fatalf("Parse(%q) = %+v, which prints as %q and parses as %+v, %v", s, tok, tok.String(), again, err)
		}
	})
}
