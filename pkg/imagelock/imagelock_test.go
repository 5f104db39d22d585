package imagelock

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func open(t *testing.T, p string) *os.File {
	t.Helper()
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// Two open file descriptions of one image, in one process even: the second
// writer and a checker see the first, with its description; after the
// first closes, the image is free.
func TestOneWriter(t *testing.T) {
	p := filepath.Join(t.TempDir(), "image")
	a, b := open(t, p), open(t, p)
	if err := Check(b); err != nil {
		t.Fatalf("Check of a free image: %v", err)
	}
	if err := Lock(a, Write, Holder("engine", "vol-1")); err != nil {
		t.Fatal(err)
	}
	err := Lock(b, Write, "")
	if !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), "volume vol-1") {
		t.Fatalf("second writer: %v, want ErrInUse naming vol-1", err)
	}
	if err := Lock(b, Read, ""); !errors.Is(err, ErrInUse) {
		t.Fatalf("reader while a writer holds it: %v, want ErrInUse", err)
	}
	if err := CheckPath(p); !errors.Is(err, ErrInUse) {
		t.Fatalf("CheckPath: %v, want ErrInUse", err)
	}
	a.Close()
	if err := Lock(b, Write, ""); err != nil {
		t.Fatalf("after the holder closed: %v", err)
	}
	if err := Unlock(b); err != nil {
		t.Fatal(err)
	}
	if err := CheckPath(p); err != nil {
		t.Fatalf("after Unlock: %v", err)
	}
}

// Readers share; a writer is refused while one reads.
func TestReaders(t *testing.T) {
	p := filepath.Join(t.TempDir(), "image")
	a, b, c := open(t, p), open(t, p), open(t, p)
	if err := Lock(a, Read, ""); err != nil {
		t.Fatal(err)
	}
	if err := Lock(b, Read, ""); err != nil {
		t.Fatalf("second reader: %v", err)
	}
	if err := Lock(c, Write, ""); !errors.Is(err, ErrInUse) {
		t.Fatalf("writer while read: %v", err)
	}
}

// The header range that crypt locks for token updates is not affected.
func TestDisjointFromHeader(t *testing.T) {
	if Offset < 2*(4<<20) || Offset <= 1<<60 {
		t.Fatalf("lock offset %d overlaps the header range or the largest image", int64(Offset))
	}
}
