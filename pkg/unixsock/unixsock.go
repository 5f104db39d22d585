// Package unixsock listens on unix sockets for the driver's gRPC services:
// it parses endpoint URLs, refuses to take over a live socket or to delete
// anything that is not a socket, and sets the socket's mode explicitly,
// whatever the umask. Dial is the client side of the one-request sockets
// (engine control, engine host).
package unixsock

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// MaxPathLen is the longest socket path accepted: sun_path holds 108 bytes
// including the terminating NUL that most clients expect.
const MaxPathLen = 107

// dialTimeout bounds the probe that tells a live socket from a stale one.
const dialTimeout = time.Second

// ParseEndpoint returns the socket path of a "unix:///abs/path" endpoint
// (also accepted: "unix:/abs/path"). Other schemes, hosts and relative
// paths are refused.
func ParseEndpoint(endpoint string) (path string, err error) {
	rest, ok := strings.CutPrefix(endpoint, "unix:")
	if !ok {
		return "", fmt.Errorf("endpoint %q: want unix:///absolute/path", endpoint)
	}
	if p, ok := strings.CutPrefix(rest, "//"); ok {
		rest = p // unix://<host>/path: the host must be empty
	}
	if rest == "" || !filepath.IsAbs(rest) {
		return "", fmt.Errorf("endpoint %q: want unix:///absolute/path", endpoint)
	}
	return filepath.Clean(rest), nil
}

// Listen listens on the unix socket path and sets the socket's mode to
// exactly mode. A missing parent directory is created with mode 0755. An
// existing socket is removed when nothing answers on it; Listen refuses if
// a process still serves on it, and refuses anything at path that is not a
// socket (it never deletes a regular file). Closing the listener removes
// the socket. Between bind and chmod the socket briefly has the mode the
// umask gives; keep its directory private where that matters.
func Listen(path string, mode os.FileMode) (net.Listener, error) {
	if err := CheckPathLen(path); err != nil {
		return nil, err
	}
	if err := ensureParent(filepath.Dir(path)); err != nil {
		return nil, err
	}
	if err := removeStale(path); err != nil {
		return nil, err
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if err := os.Chmod(path, mode); err != nil {
		ln.Close() // removes the socket
		return nil, fmt.Errorf("set mode of socket %s: %w", path, err)
	}
	return ln, nil
}

// CheckPathLen returns an error if path is too long for a unix socket.
func CheckPathLen(path string) error {
	if len(path) > MaxPathLen {
		return fmt.Errorf("socket path %s is %d bytes; a unix socket path must be at most %d (sun_path holds 108 bytes with the NUL)", path, len(path), MaxPathLen)
	}
	return nil
}

// ensureParent creates dir with mode 0755 (set explicitly) if it is missing.
func ensureParent(dir string) error {
	if _, err := os.Stat(dir); err == nil {
		return nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("socket directory %s: %w", dir, err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create socket directory %s: %w", dir, err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return fmt.Errorf("set mode of socket directory %s: %w", dir, err)
	}
	return nil
}

// removeStale clears path for a new socket: nothing there is fine, a socket
// nobody answers on is removed, anything else is refused.
func removeStale(path string) error {
	st, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("socket path %s: %w", path, err)
	}
	if st.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("socket path %s exists and is a %s, not a socket; refusing to replace it", path, kind(st.Mode()))
	}
	if c, err := net.DialTimeout("unix", path, dialTimeout); err == nil {
		c.Close()
		return fmt.Errorf("socket %s: another process is serving on it", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove stale socket %s: %w", path, err)
	}
	return nil
}

// kind names a file type for error messages.
func kind(m fs.FileMode) string {
	switch m.Type() {
	case 0:
		return "regular file"
	case fs.ModeDir:
		return "directory"
	case fs.ModeSymlink:
		return "symbolic link"
	case fs.ModeNamedPipe:
		return "named pipe"
	case fs.ModeDevice, fs.ModeDevice | fs.ModeCharDevice:
		return "device"
	}
	return "special file"
}

// Dial connects to the unix socket at path within ctx, and makes ctx's
// deadline (if any) the connection's, so that a peer that stops answering
// cannot hold the caller past it.
func Dial(ctx context.Context, path string) (*net.UnixConn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	return conn.(*net.UnixConn), nil
}
