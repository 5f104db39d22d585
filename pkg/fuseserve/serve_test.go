package fuseserve

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// memFile is an in-process File over a byte slice; it counts syncs. The
// mutex is for the race detector, which cannot see that the kernel orders a
// server's write before the client's read of the same bytes.
type memFile struct {
	mu    sync.RWMutex
	data  []byte
	size  atomic.Int64
	syncs atomic.Int64
}

func (m *memFile) ReadAt(p []byte, off int64) (int, syscall.Errno) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return copy(p, m.data[off:m.size.Load()]), 0
}

func (m *memFile) WriteAt(p []byte, off int64) (int, syscall.Errno) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(m.data[off:m.size.Load()], p), 0
}

// snapshot copies the bytes [off, off+n).
func (m *memFile) snapshot(off, n int) []byte {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return bytes.Clone(m.data[off : off+n])
}
func (m *memFile) Size() int64                                 { return m.size.Load() }
func (m *memFile) Sync() syscall.Errno                         { m.syncs.Add(1); return 0 }
func (m *memFile) Allocate(_, _ int64, _ uint32) syscall.Errno { return syscall.EOPNOTSUPP }

// aligned returns n page-aligned bytes (O_DIRECT).
func aligned(n int) []byte {
	b := make([]byte, n+4096)
	off := int((4096 - uintptr(unsafe.Pointer(&b[0]))%4096) % 4096)
	return b[off : off+n]
}

func serveInProcess(ctx context.Context, dev *os.File, sess *Session, f File, opts ServeOptions) <-chan error {
	ch := make(chan error, 1)
	go func() { ch <- Serve(ctx, dev, sess, f, opts) }()
	return ch
}

func wait(t *testing.T, ch <-chan error) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return")
		return nil
	}
}

// TestProtocolThroughTheKernel mounts a memory file and uses it through the
// kernel: attributes, directory, read, write, limits, fsync, fallocate, a
// size change, then a graceful stop and a takeover in the same process.
func TestProtocolThroughTheKernel(t *testing.T) {
	requireRoot(t)
	const size = 16 << 20
	m := &memFile{data: make([]byte, 32<<20)}
	m.size.Store(size)
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dev, sess, err := Mount(ctx, dir, MountOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	mounted := true
	defer func() {
		if mounted {
			_ = unix.Unmount(dir, unix.MNT_DETACH)
		}
	}()
	if sess.MaxWrite != 1<<20 || sess.MaxPages != 256 || sess.Flags&initAsyncDIO == 0 {
		t.Errorf("session %+v: want max_write 1 MiB, 256 pages, async DIO", *sess)
	}
	if !sess.HasResend() {
		t.Errorf("kernel does not offer FUSE_HAS_RESEND: %#x", sess.KernelFlags)
	}
	var stats Stats
	sctx, stop := context.WithCancel(ctx)
	served := serveInProcess(sctx, dev, sess, m, ServeOptions{Readers: 4, Stats: &stats})

	path := filepath.Join(dir, FileName)
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() != size || st.Mode() != 0o600 {
		t.Errorf("stat: size %d mode %v", st.Size(), st.Mode())
	}
	ents, err := os.ReadDir(dir)
	if err != nil || len(ents) != 1 || ents[0].Name() != FileName {
		t.Errorf("readdir: %v %v", ents, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "other")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stat of another name: %v", err)
	}
	var sfs unix.Statfs_t
	if err := unix.Statfs(dir, &sfs); err != nil || sfs.Bsize != 4096 {
		t.Errorf("statfs: %v %+v", err, sfs)
	}

	// Not os.OpenFile: its epoll registration would send FUSE_POLL to this
	// process's own server from a thread the Go runtime cannot stop.
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	w := aligned(3 << 20) // bigger than max_write: the kernel splits it
	for i := range w {
		w[i] = byte(i*7 + i>>12)
	}
	if n, err := f.WriteAt(w, 5*4096); err != nil || n != len(w) {
		t.Fatalf("write: %d %v", n, err)
	}
	if !bytes.Equal(m.snapshot(5*4096, len(w)), w) {
		t.Error("the file did not get the written bytes")
	}
	r := aligned(len(w))
	if n, err := f.ReadAt(r, 5*4096); err != nil || n != len(r) || !bytes.Equal(r, w) {
		t.Errorf("read back: %d %v equal=%v", n, err, bytes.Equal(r, w))
	}
	// At the end: a short read, then EOF; a write beyond the size fails.
	if n, _ := f.ReadAt(r[:8192], size-4096); n != 4096 {
		t.Errorf("read across the end: %d bytes", n)
	}
	if n, _ := f.ReadAt(r[:4096], size); n != 0 {
		t.Errorf("read at the end: %d bytes", n)
	}
	if _, err := f.WriteAt(r[:4096], size); err == nil {
		t.Error("write beyond the size succeeded")
	}
	if err := f.Sync(); err != nil || m.syncs.Load() == 0 {
		t.Errorf("fsync: %v, %d syncs", err, m.syncs.Load())
	}
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, 4096); !errors.Is(err, unix.EOPNOTSUPP) {
		t.Errorf("fallocate: %v, want EOPNOTSUPP from the File", err)
	}
	if err := f.Truncate(size / 2); !errors.Is(err, unix.EPERM) {
		t.Errorf("truncate: %v, want EPERM", err)
	}
	if err := f.Truncate(size); err != nil {
		t.Errorf("truncate to the same size: %v", err)
	}
	// Growth: the kernel sees it after InvalidateAttr.
	m.size.Store(size * 2)
	if err := InvalidateAttr(dev); err != nil {
		t.Error(err)
	}
	if st, err := f.Stat(); err != nil || st.Size() != size*2 {
		t.Errorf("size after growth: %v %v", st.Size(), err)
	}
	if stats.Requests.Load() == 0 || stats.Resent.Load() != 0 {
		t.Errorf("stats: %d requests, %d resent", stats.Requests.Load(), stats.Resent.Load())
	}

	// Graceful stop: Serve returns ctx's error and the mount stays.
	stop()
	if err := wait(t, served); !errors.Is(err, context.Canceled) {
		t.Fatalf("Serve after cancel: %v", err)
	}
	// A request now waits for the next server; that one resends and serves it.
	got := make(chan error, 1)
	go func() {
		_, err := f.ReadAt(r[:4096], 5*4096)
		got <- err
	}()
	time.Sleep(200 * time.Millisecond)
	select {
	case err := <-got:
		t.Fatalf("read without a server returned: %v", err)
	default:
	}
	var stats2 Stats
	served = serveInProcess(ctx, dev, sess, m, ServeOptions{Readers: 2, Resend: true, Stats: &stats2})
	select {
	case err := <-got:
		if err != nil || !bytes.Equal(r[:4096], w[:4096]) {
			t.Errorf("read after takeover: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("read did not complete after takeover")
	}
	f.Close()
	if err := Unmount(dir); err != nil {
		t.Fatal(err)
	}
	mounted = false
	if err := wait(t, served); err != nil {
		t.Errorf("Serve after unmount: %v", err)
	}
	t.Logf("first server %d requests; second %d requests, %d resent", stats.Requests.Load(), stats2.Requests.Load(), stats2.Resent.Load())
}

func TestSessionPassingHonoursContext(t *testing.T) {
	a, b, err := socketPair()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	defer b.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, _, err := ReceiveSession(ctx, a); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("receive with nothing sent: %v", err)
	}
	// A round trip with two descriptors.
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	sess := &Session{Major: 7, Minor: 45, MaxWrite: 1 << 20, MaxPages: 256, KernelFlags: initHasResend}
	if err := SendSession(context.Background(), b, sess, r, w); err != nil {
		t.Fatal(err)
	}
	got, files, err := ReceiveSession(context.Background(), a)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		defer f.Close()
	}
	if *got != *sess || len(files) != 2 {
		t.Fatalf("got %+v, %d files", *got, len(files))
	}
	if _, err := files[1].Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1)
	if _, err := r.Read(buf); err != nil || buf[0] != 'x' {
		t.Errorf("passed pipe: %v %q", err, buf)
	}
}

func socketPair() (*net.UnixConn, *net.UnixConn, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	conns := make([]*net.UnixConn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socket")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			return nil, nil, err
		}
		conns[i] = c.(*net.UnixConn)
	}
	return conns[0], conns[1], nil
}

// TestStopOnAFreshMount stops a server before the kernel knows the file's
// inode (no retrieve possible): Serve still returns.
func TestStopOnAFreshMount(t *testing.T) {
	requireRoot(t)
	m := &memFile{data: make([]byte, 1<<20)}
	m.size.Store(1 << 20)
	dir := t.TempDir()
	dev, sess, err := Mount(context.Background(), dir, MountOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	defer func() { _ = unix.Unmount(dir, unix.MNT_DETACH) }()
	ctx, cancel := context.WithCancel(context.Background())
	served := serveInProcess(ctx, dev, sess, m, ServeOptions{Readers: 3})
	time.Sleep(50 * time.Millisecond)
	cancel()
	if err := wait(t, served); !errors.Is(err, context.Canceled) {
		t.Errorf("Serve: %v", err)
	}
}
