package bytesize

import (
	"flag"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	for in, want := range map[string]int64{
		"4096": 4096, "1K": 1 << 10, "1Ki": 1 << 10, "1KiB": 1 << 10, "64M": 64 << 20, "64Mi": 64 << 20,
		"1G": 1 << 30, "1Gi": 1 << 30, "2T": 2 << 40, "1GB": 1e9, "1MB": 1e6, "1KB": 1000, "1TB": 1e12,
		"512B": 512, " 8M ": 8 << 20, "1024T": 1 << 50,
	} {
		if got, err := Parse(in); err != nil || got != want {
			t.Errorf("Parse(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "0", "-1", "1X", "G", "1.5G", "1 G", "+1G", "1025T", "1g", "9223372036854775807K"} {
		if _, err := Parse(in); err == nil {
			t.Errorf("Parse(%q) accepted", in)
		}
	}
}

func TestSectorMultiple(t *testing.T) {
	n, _ := Parse("1GB")
	err := SectorMultiple("1GB", n, 4096)
	if err == nil || !strings.Contains(err.Error(), "powers of 1000") || !strings.Contains(err.Error(), "1000000000") {
		t.Fatalf("1GB at 4096: %v", err)
	}
	if err := SectorMultiple("1000", 1000, 512); err == nil || strings.Contains(err.Error(), "powers of 1000") {
		t.Fatalf("1000 bytes at 512: %v (no unit hint expected)", err)
	}
	if err := SectorMultiple("1G", 1<<30, 4096); err != nil {
		t.Fatal(err)
	}
}

func TestFlag(t *testing.T) {
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	v := Flag(fs, "size", 1<<30, "size")
	if *v != 1<<30 {
		t.Fatal(*v)
	}
	if err := fs.Parse([]string{"--size", "64Mi"}); err != nil || *v != 64<<20 {
		t.Fatalf("%d %v", *v, err)
	}
	if err := fs.Parse([]string{"--size", "lots"}); err == nil {
		t.Fatal("bad size accepted")
	}
}
