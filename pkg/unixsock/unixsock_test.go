package unixsock

import (
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

func TestParseEndpoint(t *testing.T) {
	for in, want := range map[string]string{
		"unix:///csi/csi.sock":    "/csi/csi.sock",
		"unix:/csi/csi.sock":      "/csi/csi.sock",
		"unix:///a/../b/./s.sock": "/b/s.sock",
	} {
		got, err := ParseEndpoint(in)
		if err != nil || got != want {
			t.Errorf("ParseEndpoint(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"", "/csi/csi.sock", "tcp://1.2.3.4:5", "unix://", "unix:relative.sock", "unix://host/csi.sock", "unix:"} {
		if got, err := ParseEndpoint(in); err == nil {
			t.Errorf("ParseEndpoint(%q) = %q; want an error", in, got)
		}
	}
}

func mode(t *testing.T, path string) fs.FileMode {
	t.Helper()
	st, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Mode()
}

func TestListenSetsModeWhateverTheUmask(t *testing.T) {
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	dir := filepath.Join(t.TempDir(), "new", "dir")
	path := filepath.Join(dir, "csi.sock")
	ln, err := Listen(path, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if m := mode(t, path); m.Type() != fs.ModeSocket || m.Perm() != 0o600 {
		t.Fatalf("socket mode %v, want socket 0600", m)
	}
	if m := mode(t, dir); !m.IsDir() || m.Perm() != 0o755 {
		t.Fatalf("created parent mode %v, want directory 0755", m)
	}
	// It serves.
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
}

func TestListenRefusesLiveSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.sock")
	ln, err := Listen(path, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ln2, err := Listen(path, 0o600)
	if err == nil {
		ln2.Close()
		t.Fatal("Listen on a live socket: want an error")
	}
	if !strings.Contains(err.Error(), "another process is serving on it") {
		t.Fatalf("error %q does not say the socket is served", err)
	}
	// The live socket still works.
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("the live socket was disturbed: %v", err)
	}
	c.Close()
}

func TestListenReplacesStaleSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	if mode(t, path).Type() != fs.ModeSocket {
		t.Fatal("test setup: no stale socket")
	}
	ln, err := Listen(path, 0o660)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	if m := mode(t, path).Perm(); m != 0o660 {
		t.Fatalf("mode %v, want 0660", m)
	}
	ln.Close()
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Fatalf("Close left the socket: %v", err)
	}
}

func TestListenNeverDeletesAFile(t *testing.T) {
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	dir := t.TempDir()
	path := filepath.Join(dir, "csi.sock")
	if err := os.WriteFile(path, []byte("precious"), 0o644); err != nil {
		t.Fatal(err)
	}
	ln, err := Listen(path, 0o600)
	if err == nil {
		ln.Close()
		t.Fatal("Listen over a regular file: want an error")
	}
	if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "regular file") {
		t.Fatalf("error %q does not name the path and what is there", err)
	}
	b, err := os.ReadFile(path)
	if err != nil || string(b) != "precious" {
		t.Fatalf("the regular file did not survive: %q, %v", b, err)
	}
	if m := mode(t, path).Perm(); m != 0o644 {
		t.Fatalf("the file's mode changed to %v", m)
	}
	sub := filepath.Join(dir, "adir")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	if ln, err := Listen(sub, 0o600); err == nil {
		ln.Close()
		t.Fatal("Listen over a directory: want an error")
	}
	if !mode(t, sub).IsDir() {
		t.Fatal("the directory did not survive")
	}
}

func TestListenRefusesLongPath(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, strings.Repeat("x", MaxPathLen+1-len(dir)-1))
	if len(path) != MaxPathLen+1 {
		t.Fatalf("test setup: path length %d", len(path))
	}
	_, err := Listen(path, 0o600)
	if err == nil || !strings.Contains(err.Error(), "108") {
		t.Fatalf("Listen on a %d-byte path: got %v, want an error about the 108-byte limit", len(path), err)
	}
	ok := path[:len(path)-1]
	ln, err := Listen(ok, 0o600)
	if err != nil {
		t.Fatalf("Listen on a %d-byte path: %v", len(ok), err)
	}
	ln.Close()
}
