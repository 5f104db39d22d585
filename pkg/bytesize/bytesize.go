// Package bytesize is the one size syntax of every csi-encdisk command
// (volume format --size, demo --size, the bench tools): a whole number of
// bytes, optionally followed by a unit.
//
//	K M G T          powers of 1024 (as are Ki Mi Gi Ti and KiB MiB GiB TiB)
//	KB MB GB TB      powers of 1000 (as disk makers count)
//
// "1G" and "1Gi" are 2^30 bytes; "1GB" is 10^9, which is not a multiple of
// a 4096-byte sector: SectorMultiple says so and suggests the binary unit.
package bytesize

import (
	"errors"
	"flag"
	"fmt"
	"strconv"
	"strings"
)

// Syntax is the one-line description used in flag help and errors.
const Syntax = "bytes, or a number with K, M, G, T (or Ki, Mi, Gi, Ti: powers of 1024) or KB, MB, GB, TB (powers of 1000)"

// Max is the largest size accepted: 1 PiB (2^50).
const Max int64 = 1 << 50

var units = []struct {
	suffix string
	mult   int64
}{
	{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40},
	{"Ki", 1 << 10}, {"Mi", 1 << 20}, {"Gi", 1 << 30}, {"Ti", 1 << 40},
	{"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12},
	{"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"T", 1 << 40},
	{"B", 1},
}

// Parse reads a positive size in the syntax of the package.
func Parse(s string) (int64, error) {
	t := strings.TrimSpace(s)
	mult := int64(1)
	for _, u := range units {
		if rest, ok := strings.CutSuffix(t, u.suffix); ok {
			t, mult = rest, u.mult
			break
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n <= 0 || t != strings.TrimSpace(t) || strings.HasPrefix(t, "+") {
		return 0, fmt.Errorf("size %q: want %s", s, Syntax)
	}
	if n > Max/mult {
		return 0, fmt.Errorf("size %q: larger than the maximum of %d bytes (1 PiB)", s, Max)
	}
	return n * mult, nil
}

// SectorMultiple returns nil if n (parsed from text) is a whole number of
// sectors, else an error that shows the bytes and, for a decimal unit,
// says that KB, MB, GB and TB are powers of 1000.
func SectorMultiple(text string, n int64, sector int) error {
	if sector <= 0 || n%int64(sector) == 0 {
		return nil
	}
	msg := fmt.Sprintf("size %s (%d bytes) is not a multiple of the sector size %d", text, n, sector)
	if t := strings.TrimSpace(text); strings.HasSuffix(t, "B") && !strings.HasSuffix(t, "iB") && len(t) > 2 && strings.ContainsAny(t[len(t)-2:len(t)-1], "KMGT") {
		msg += "; KB, MB, GB and TB are powers of 1000: use K, M, G, T or Ki, Mi, Gi, Ti for powers of 1024"
	}
	return errors.New(msg)
}

// Value is a flag.Value holding a size in this syntax.
type Value int64

var _ flag.Value = (*Value)(nil)

// String prints the size in bytes.
func (v *Value) String() string { return strconv.FormatInt(int64(*v), 10) }

// Set parses s.
func (v *Value) Set(s string) error {
	n, err := Parse(s)
	if err != nil {
		return err
	}
	*v = Value(n)
	return nil
}

// Flag defines a size flag on fs with a default in bytes.
func Flag(fs *flag.FlagSet, name string, def int64, usage string) *int64 {
	v := Value(def)
	fs.Var(&v, name, usage+" ("+Syntax+")")
	return (*int64)(&v)
}
