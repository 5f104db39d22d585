package fuseserve

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-encdisk/csi-encdisk/pkg/uring"
)

// asyncMem is a memFile served asynchronously: Submit prepares a NOP on
// the server thread's ring and the memory I/O happens when it completes.
type asyncMem struct {
	*memFile
}

func newAsyncMem(m *memFile) *asyncMem { return &asyncMem{memFile: m} }

func (a *asyncMem) NewQueue(r *uring.Ring) (Queue, error) {
	return &memQueue{m: a.memFile, r: r, ops: map[uint64]*Op{}}, nil
}

// memQueue: with r nil, Submit does the I/O at once.
type memQueue struct {
	m    *memFile
	r    *uring.Ring
	ops  map[uint64]*Op
	next uint64
}

func (q *memQueue) Submit(op *Op) {
	if q.r == nil {
		q.do(op)
		return
	}
	q.next++
	err := q.r.PrepNop(q.next)
	if err == uring.ErrFull {
		if err = q.r.Submit(); err == nil {
			err = q.r.PrepNop(q.next)
		}
	}
	if err != nil {
		op.Complete(0, unix.EIO)
		return
	}
	q.ops[q.next] = op
}

func (q *memQueue) Complete(u uint64, res int32) {
	op := q.ops[u]
	delete(q.ops, u)
	if op != nil {
		q.do(op)
	}
}

func (q *memQueue) do(op *Op) {
	if op.Write {
		n, e := q.m.WriteAt(op.Buf, op.Off)
		op.Complete(n, e)
		return
	}
	n, e := q.m.ReadAt(op.Buf, op.Off)
	op.Complete(n, e)
}

func (q *memQueue) Close() {}

// TestAsyncThroughTheKernel serves a memory file on two clones of the
// connection through the asynchronous path: large and small, concurrent
// reads and writes come back right, the other requests still work, and a
// cancelled Serve returns after answering what it read; a server on the
// plain descriptor then takes over.
func TestAsyncThroughTheKernel(t *testing.T) {
	requireRoot(t)
	const size = 16 << 20
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	m, dir, dev, sess, clones := mountMemFile(t, ctx, MountOptions{}, size, 2)
	a := newAsyncMem(m)
	var stats Stats
	sctx, stop := context.WithCancel(ctx)
	served := serveInProcess(sctx, dev, sess, a, ServeOptions{Clones: clones, Stats: &stats, BigBuffers: 2, SmallBuffers: 4})

	path := filepath.Join(dir, FileName)
	// Not os.OpenFile: it would register the FUSE file with the process's
	// epoll, whose poll call (FUSE_POLL) waits for this process's readers,
	// which wait in that epoll. (An engine never opens its own file.)
	f, w := exerciseFile(t, path, m, size, 16, 50)
	if _, err := os.Stat(path); err != nil {
		t.Error(err)
	}
	f.Close()
	stop()
	if err := wait(t, served); !errors.Is(err, context.Canceled) {
		t.Fatalf("Serve after cancel: %v", err)
	}
	if stats.Requests.Load() == 0 || stats.ReplyFailures.Load() != 0 {
		t.Errorf("stats: %d requests, %d reply failures", stats.Requests.Load(), stats.ReplyFailures.Load())
	}
	// A blocking server on the connection's own descriptor takes over.
	served = serveInProcess(ctx, dev, sess, m, ServeOptions{Readers: 2, Resend: true})
	// Not os.ReadFile either: its epoll registration sends FUSE_POLL from
	// inside the Go runtime, on a thread that keeps its P; a garbage
	// collection then waits for that thread while the reader that would
	// answer waits for the collection (seen here under load: a 120 s hang).
	got := aligned(len(w))
	if fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0); err != nil {
		t.Error(err)
	} else {
		n, err := unix.Pread(fd, got, 4096)
		unix.Close(fd)
		if err != nil || n != len(got) || !bytes.Equal(got, w) {
			t.Errorf("read after takeover: %d bytes, %v, equal=%v", n, err, bytes.Equal(got, w))
		}
	}
	if err := Unmount(dir); err != nil {
		t.Fatal(err)
	}
	if err := wait(t, served); err != nil {
		t.Errorf("Serve after unmount: %v", err)
	}
}

// TestAsyncNoAllocationPerRequest: starting a READ or WRITE on the
// asynchronous path and completing it allocates nothing.
func TestAsyncNoAllocationPerRequest(t *testing.T) {
	null, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	m := &memFile{data: make([]byte, 4<<20)}
	m.size.Store(4 << 20)
	sess := &Session{Major: 7, Minor: 45, MaxWrite: 1 << 20, MaxPages: 256}
	s := &server{fd: int(null.Fd()), sess: sess, file: m, stats: &Stats{}}
	as := &asyncServer{s: s, file: newAsyncMem(m), smallSz: DefaultSmallSize}
	r := &asyncReader{as: as, fd: int(null.Fd()), rbuf: alignedAt(bigPayloadOff+1<<20, bigPayloadOff)}
	r.q = &memQueue{m: m}
	r.big = []*Op{{owner: r, buf: alignedAt(bigPayloadOff+1<<20, bigPayloadOff), big: true}}
	r.small = []*Op{{owner: r, buf: alignedAt(DefaultSmallSize, 0)}}
	r.sync = &reader{s: s, fd: r.fd, in: r.rbuf, out: alignedAt(outHeaderSize+8192, outHeaderSize)}
	for _, tc := range []struct {
		name   string
		opcode uint32
		size   int
	}{{"read 4k", opRead, 4096}, {"write 4k", opWrite, 4096}, {"read 1m", opRead, 1 << 20}, {"write 1m", opWrite, 1 << 20}} {
		allocs := testing.AllocsPerRun(100, func() {
			n := inHeaderSize + readInSize
			if tc.opcode == opWrite {
				n = inHeaderSize + writeInSize + tc.size
			}
			b := r.rbuf
			le.PutUint32(b[0:], uint32(n))
			le.PutUint32(b[4:], tc.opcode)
			le.PutUint64(b[8:], 7)
			le.PutUint64(b[16:], fileNodeID)
			le.PutUint64(b[inHeaderSize+8:], 65536)
			le.PutUint32(b[inHeaderSize+16:], uint32(tc.size))
			if err := r.handle(n); err != nil {
				t.Fatal(err)
			}
		})
		if allocs != 0 {
			t.Errorf("%s: %.1f allocations per request", tc.name, allocs)
		}
	}
	if s.stats.ReplyFailures.Load() != 0 || s.stats.Errors.Load() != 0 {
		t.Errorf("stats: %d reply failures, %d errors", s.stats.ReplyFailures.Load(), s.stats.Errors.Load())
	}
}

// exerciseFile opens the served file at path (O_DIRECT, not os.OpenFile:
// that would register it with the process's epoll, whose FUSE_POLL would
// wait for this process's own server) and checks it against m, a memFile
// of size bytes: 3 MiB written at 4096 and read back, then g goroutines of
// n 4 KiB writes and reads each (more than the buffers: they bound, not
// fail), a write beyond the size refused, fsync reaching m. It returns the
// open file and what was written at 4096.
func exerciseFile(t *testing.T, path string, m *memFile, size int64, g, n int) (*os.File, []byte) {
	t.Helper()
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fd), path)
	w := aligned(3 << 20)
	for i := range w {
		w[i] = byte(i*13 + i>>12)
	}
	if n, err := f.WriteAt(w, 4096); err != nil || n != len(w) {
		t.Fatalf("write: %d %v", n, err)
	}
	r := aligned(len(w))
	if n, err := f.ReadAt(r, 4096); err != nil || n != len(r) || !bytes.Equal(r, w) {
		t.Fatalf("read back: %d %v equal=%v", n, err, bytes.Equal(r, w))
	}
	if !bytes.Equal(m.snapshot(4096, len(w)), w) {
		t.Fatal("the file's memory does not hold what was written")
	}
	var wg sync.WaitGroup
	for gi := range g {
		wg.Go(func() {
			b, c := aligned(4096), aligned(4096)
			for i := range n {
				off := int64((gi*n+i)%1024) * 4096
				for j := range b {
					b[j] = byte(gi + i + j)
				}
				if _, err := f.WriteAt(b, 8<<20+off); err != nil {
					t.Error(err)
					return
				}
				if _, err := f.ReadAt(c, 8<<20+off); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if _, err := f.WriteAt(r[:4096], size); err == nil {
		t.Error("write beyond the size succeeded")
	}
	if err := f.Sync(); err != nil || m.syncs.Load() == 0 {
		t.Errorf("fsync: %v, %d syncs", err, m.syncs.Load())
	}
	return f, w
}

// mountMemFile mounts a new connection on a temporary directory for a
// memFile of size bytes and makes n clones of it; the test's cleanup closes
// them and unmounts.
func mountMemFile(t *testing.T, ctx context.Context, opts MountOptions, size int64, n int) (*memFile, string, *os.File, *Session, []*os.File) {
	t.Helper()
	m := &memFile{data: make([]byte, size)}
	m.size.Store(size)
	dir := t.TempDir()
	dev, sess, err := Mount(ctx, dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		dev.Close()
		_ = unix.Unmount(dir, unix.MNT_DETACH)
	})
	clones, err := Clones(dev, n)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, c := range clones {
			c.Close()
		}
	})
	return m, dir, dev, sess, clones
}
