package fuseserve

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"sync/atomic"

	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The test binary doubles as a server process: started with
// FUSESERVE_TEST_CHILD set to a unix socket path, it receives the /dev/fuse
// descriptor, the session and the backing memfd from the test (the
// supervisor) and serves them.
const childEnv = "FUSESERVE_TEST_CHILD"

func TestMain(m *testing.M) {
	if sock := os.Getenv(childEnv); sock != "" {
		if err := runChild(sock); err != nil {
			fmt.Fprintln(os.Stderr, "child:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// childResult is what a server process prints when its Serve returns.
type childResult struct {
	Requests, Resent, Errors, ReplyFailures uint64
	Err                                     string
}

func runChild(sock string) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		return err
	}
	defer conn.Close()
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	sess, files, err := ReceiveSession(rctx, conn)
	cancel()
	if err != nil {
		return err
	}
	if len(files) != 2 {
		return fmt.Errorf("%d files", len(files))
	}
	mem := files[1]
	st, err := mem.Stat()
	if err != nil {
		return err
	}
	f := &fdFile{file: mem, fd: int(mem.Fd()), size: st.Size()}
	// Replay test: writes at these offsets stop the server's progress,
	// after (apply) or before (before) reaching the memory, and say so on
	// the socket.
	if v := os.Getenv("FUSESERVE_HANG_APPLY"); v != "" {
		f.hangApply, _ = strconv.ParseInt(v, 10, 64)
		f.hangBefore, _ = strconv.ParseInt(os.Getenv("FUSESERVE_HANG_BEFORE"), 10, 64)
		f.hang = func() { _, _ = conn.Write([]byte{'h'}); select {} }
	}
	// Negative control of fio's verification: acknowledge every n-th write
	// without storing it.
	if v := os.Getenv("FUSESERVE_DROP_EVERY"); v != "" {
		f.dropEvery, _ = strconv.ParseInt(v, 10, 64)
	}
	var stats Stats
	err = Serve(ctx, files[0], sess, f, ServeOptions{Readers: 8, Resend: os.Getenv("FUSESERVE_RESEND") == "1", Stats: &stats})
	res := childResult{Requests: stats.Requests.Load(), Resent: stats.Resent.Load(), Errors: stats.Errors.Load(), ReplyFailures: stats.ReplyFailures.Load()}
	if err != nil {
		res.Err = err.Error()
	}
	return json.NewEncoder(os.Stdout).Encode(&res)
}

// fdFile serves a descriptor (a memfd in the tests) with pread/pwrite.
type fdFile struct {
	file *os.File // keeps fd open (its finalizer would close it)
	fd   int
	size int64

	hangApply, hangBefore int64 // replay test, if hang is set
	hang                  func()

	dropEvery int64 // negative control: drop every dropEvery-th write
	writes    atomic.Int64
}

func (f *fdFile) ReadAt(p []byte, off int64) (int, syscall.Errno) {
	n, err := unix.Pread(f.fd, p, off)
	if err != nil {
		return 0, err.(syscall.Errno)
	}
	return n, 0
}

func (f *fdFile) WriteAt(p []byte, off int64) (int, syscall.Errno) {
	if os.Getenv("FUSESERVE_TRACE") != "" {
		fmt.Fprintf(os.Stderr, "pid %d write %d+%d\n", os.Getpid(), off, len(p))
	}
	if f.dropEvery > 0 && f.writes.Add(1)%f.dropEvery == 0 {
		return len(p), 0
	}
	if f.hang != nil && off == f.hangBefore {
		f.hang()
	}
	n, err := unix.Pwrite(f.fd, p, off)
	if err != nil {
		return 0, err.(syscall.Errno)
	}
	if f.hang != nil && off == f.hangApply {
		f.hang()
	}
	return n, 0
}

func (f *fdFile) Size() int64                                 { return f.size }
func (f *fdFile) Sync() syscall.Errno                         { return 0 }
func (f *fdFile) Allocate(_, _ int64, _ uint32) syscall.Errno { return syscall.EOPNOTSUPP }

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test mounts FUSE and attaches loop devices: run it as root")
	}
}

// newMemfd returns a memory-backed file of size bytes.
func newMemfd(t *testing.T, size int64) *os.File {
	t.Helper()
	fd, err := unix.MemfdCreate("fuseserve-test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), "memfd")
	t.Cleanup(func() { f.Close() })
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return f
}

// supervisor is what an engine host will be: it mounts, keeps the
// descriptor, and runs server processes on it one after the other.
type supervisor struct {
	t     *testing.T
	dir   string
	dev   *os.File
	sess  *Session
	mem   *os.File
	ln    *net.UnixListener
	child *exec.Cmd
	conn  *net.UnixConn
	out   *bytes.Buffer
	gen   int

	unmounted bool
}

// unmount unmounts the FUSE mount (the loop device must be detached).
func (s *supervisor) unmount() {
	s.t.Helper()
	if err := Unmount(s.dir); err != nil {
		s.t.Fatal(err)
	}
	s.unmounted = true
}

func newSupervisor(t *testing.T, size int64) *supervisor {
	t.Helper()
	requireRoot(t)
	s := &supervisor{t: t, dir: t.TempDir(), mem: newMemfd(t, size)}
	sockDir := t.TempDir()
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(sockDir, "s"), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	s.ln = ln
	t.Cleanup(func() { ln.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s.dev, s.sess, err = Mount(ctx, s.dir, MountOptions{FsName: "fuseserve-test", RequestTimeout: 60 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("session: %+v resend=%v", *s.sess, s.sess.HasResend())
	t.Cleanup(s.teardown)
	return s
}

// start runs a new server process on the connection.
func (s *supervisor) start(resend bool, env ...string) {
	t := s.t
	t.Helper()
	s.gen++
	c := exec.Command(os.Args[0], "-test.run=^$")
	c.Env = append(os.Environ(), childEnv+"="+s.ln.Addr().String(), "FUSESERVE_RESEND="+map[bool]string{true: "1", false: "0"}[resend])
	c.Env = append(c.Env, env...)
	s.out = &bytes.Buffer{}
	c.Stdout, c.Stderr = s.out, os.Stderr
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	s.child = c
	_ = s.ln.SetDeadline(time.Now().Add(10 * time.Second))
	conn, err := s.ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	s.conn = conn
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := SendSession(ctx, conn, s.sess, s.dev, s.mem); err != nil {
		t.Fatal(err)
	}
}

// kill SIGKILLs the server and reaps it.
func (s *supervisor) kill() {
	if s.child == nil {
		return
	}
	_ = s.child.Process.Kill()
	_ = s.child.Wait()
	s.conn.Close()
	s.child = nil
}

// result waits for the server to end by itself (after the unmount).
func (s *supervisor) result() childResult {
	t := s.t
	t.Helper()
	var res childResult
	if s.child == nil {
		return res
	}
	done := make(chan error, 1)
	go func() { done <- s.child.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("server process: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Errorf("server process did not end after the unmount")
		s.kill()
		return res
	}
	s.conn.Close()
	s.child = nil
	if err := json.Unmarshal(s.out.Bytes(), &res); err != nil {
		t.Errorf("server output %q: %v", s.out.String(), err)
	}
	if res.Err != "" {
		t.Errorf("server: %s", res.Err)
	}
	return res
}

func (s *supervisor) teardown() {
	if s.dev == nil {
		return
	}
	if !s.unmounted {
		if err := Unmount(s.dir); err != nil {
			s.t.Errorf("%v", err)
			_ = unix.Unmount(s.dir, unix.MNT_DETACH)
		}
	}
	s.kill()
	s.dev.Close()
	s.dev = nil
}

// loopAttach attaches a loop device (direct I/O, 4096-byte sectors) to file.
func loopAttach(t *testing.T, file string) string {
	t.Helper()
	out, err := exec.Command("losetup", "--direct-io=on", "--sector-size", "4096", "-f", "--show", file).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup: %v: %s", err, out)
	}
	dev := string(bytes.TrimSpace(out))
	return dev
}

func loopDetach(t *testing.T, dev string) {
	t.Helper()
	if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
		t.Errorf("losetup -d %s: %v: %s", dev, err, out)
	}
}
