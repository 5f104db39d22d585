package atomicfile

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// withUmask runs f under umask mask (process-wide: these tests are not parallel).
func withUmask(t *testing.T, mask int, f func()) {
	t.Helper()
	old := syscall.Umask(mask)
	defer syscall.Umask(old)
	f()
}

func assertNoTemp(t *testing.T, dir string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".tmp-") {
			t.Fatalf("temporary file left behind: %s", e.Name())
		}
	}
}

func assertFile(t *testing.T, path string, data []byte, perm os.FileMode) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("%s holds %q, want %q", path, got, data)
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != perm {
		t.Fatalf("%s has mode %v, want %v", path, st.Mode().Perm(), perm)
	}
}

func TestWriteFileReplacesWithExactMode(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "state.json")
	withUmask(t, 0o077, func() {
		if err := WriteFile(p, []byte("one"), 0o644); err != nil {
			t.Fatal(err)
		}
	})
	assertFile(t, p, []byte("one"), 0o644) // not 0600: the umask must not apply
	withUmask(t, 0, func() {
		if err := WriteFile(p, []byte("two"), 0o600); err != nil {
			t.Fatal(err)
		}
	})
	assertFile(t, p, []byte("two"), 0o600) // not 0666 nor the old 0644
	assertNoTemp(t, dir)
}

func TestWriteFileFailureLeavesNoTempAndOldContent(t *testing.T) {
	dir := t.TempDir()
	// A non-empty directory at the path: rename(2) of a file over it fails.
	p := filepath.Join(dir, "target")
	if err := os.MkdirAll(filepath.Join(p, "child"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := WriteFile(p, []byte("x"), 0o600); err == nil {
		t.Fatal("WriteFile over a directory: want an error")
	} else if !strings.Contains(err.Error(), p) {
		t.Fatalf("error %q does not name the path", err)
	}
	if st, err := os.Stat(filepath.Join(p, "child")); err != nil || !st.IsDir() {
		t.Fatalf("directory at the path was disturbed: %v", err)
	}
	assertNoTemp(t, dir)

	if err := WriteFile(filepath.Join(dir, "missing", "f"), []byte("x"), 0o600); err == nil {
		t.Fatal("WriteFile into a missing directory: want an error")
	}
}

func TestCreateNeverReplaces(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "master.key")
	withUmask(t, 0, func() {
		if err := Create(p, []byte("key-1"), 0o600); err != nil {
			t.Fatal(err)
		}
	})
	assertFile(t, p, []byte("key-1"), 0o600)
	err := Create(p, []byte("key-2"), 0o644)
	if !errors.Is(err, fs.ErrExist) {
		t.Fatalf("Create over an existing file: got %v, want fs.ErrExist", err)
	}
	assertFile(t, p, []byte("key-1"), 0o600)
	assertNoTemp(t, dir)
	// Exactly one link: the temporary name is gone after a success too.
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	if n := st.Sys().(*syscall.Stat_t).Nlink; n != 1 {
		t.Fatalf("%s has %d links, want 1", p, n)
	}
}

func TestSyncDir(t *testing.T) {
	if err := SyncDir(t.TempDir()); err != nil {
		t.Fatal(err)
	}
	if err := SyncDir(filepath.Join(t.TempDir(), "nope")); err == nil {
		t.Fatal("SyncDir of a missing directory: want an error")
	}
}
