package uring

import (
	"bytes"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// benchImage is an allocated O_DIRECT file on a disk filesystem (/var/tmp;
// BENCH_DIR overrides), so writes do not allocate.
func benchImage(tb testing.TB, size int64) *os.File {
	tb.Helper()
	dir := os.Getenv("BENCH_DIR")
	if dir == "" {
		dir = "/var/tmp"
	}
	f, err := os.CreateTemp(dir, "uring-bench-*.img")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { f.Close(); os.Remove(f.Name()) })
	// Written, not only allocated: reads of unwritten extents do no I/O.
	chunk := make([]byte, 1<<20)
	for i := range chunk {
		chunk[i] = byte(i)
	}
	for off := int64(0); off < size; off += int64(len(chunk)) {
		if _, err := f.WriteAt(chunk, off); err != nil {
			tb.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		tb.Fatal(err)
	}
	d, err := os.OpenFile(f.Name(), os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { d.Close() })
	return d
}

// alignedBuf is n bytes on a page boundary (O_DIRECT).
func alignedBuf(n int) []byte {
	b := make([]byte, n+4096)
	off := (4096 - int(uintptr(unsafe.Pointer(&b[0]))%4096)) % 4096
	return b[off : off+n : off+n]
}

// newRing is a ring for a test, on the test goroutine's locked thread; this
// machine kind has io_uring, so a ring that cannot be set up fails the test.
func newRing(tb testing.TB, entries uint32, flags Flags) *Ring {
	tb.Helper()
	runtime.LockOSThread()
	tb.Cleanup(runtime.UnlockOSThread)
	r, err := New(entries, flags)
	if err != nil {
		tb.Fatalf("io_uring: %v", err)
	}
	tb.Cleanup(r.Close)
	return r
}

// waitFor submits and reaps until want completions have come.
func waitFor(t *testing.T, r *Ring, want int) map[uint64]int32 {
	t.Helper()
	got := map[uint64]int32{}
	for len(got) < want {
		if err := r.SubmitAndWait(); err != nil {
			t.Fatal(err)
		}
		r.Reap(func(u uint64, res int32) { got[u] = res })
	}
	return got
}

// TestReadWrite writes and reads back through the ring, with every kind of
// ring the project sets up.
func TestReadWrite(t *testing.T) {
	f := benchImage(t, 1<<20)
	for _, flags := range []Flags{0, SingleIssuer | DeferTaskrun, SingleIssuer | DeferTaskrun | SQE128} {
		r := newRing(t, 8, flags)
		w := alignedBuf(8192)
		for i := range w {
			w[i] = byte(i*7) + byte(flags>>10)
		}
		rd := alignedBuf(8192)
		if err := r.PrepWrite(int(f.Fd()), w, 65536, 1); err != nil {
			t.Fatal(err)
		}
		if got := waitFor(t, r, 1); got[1] != 8192 {
			t.Fatalf("flags %#x: write result %v", flags, got)
		}
		if err := r.PrepRead(int(f.Fd()), rd, 65536, 2); err != nil {
			t.Fatal(err)
		}
		if got := waitFor(t, r, 1); got[2] != 8192 {
			t.Fatalf("flags %#x: read result %v", flags, got)
		}
		if !bytes.Equal(rd, w) {
			t.Fatalf("flags %#x: read back other bytes", flags)
		}
	}
}

// TestFullAndPoll: a full submission queue says so and takes entries again
// after Submit; a poll completes only once its descriptor is readable.
func TestFullAndPoll(t *testing.T) {
	r := newRing(t, 4, SingleIssuer|DeferTaskrun)
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	for i := range r.Entries() {
		if err := r.PrepPoll(p[0], uint64(i)); err != nil {
			t.Fatalf("poll %d: %v", i, err)
		}
	}
	if err := r.PrepPoll(p[0], 99); err != ErrFull {
		t.Fatalf("beyond the entries: %v, want ErrFull", err)
	}
	if err := r.Submit(); err != nil {
		t.Fatal(err)
	}
	if n := r.Reap(func(uint64, int32) {}); n != 0 {
		t.Fatalf("%d completions before the pipe was written", n)
	}
	if _, err := unix.Write(p[1], []byte{1}); err != nil {
		t.Fatal(err)
	}
	got := waitFor(t, r, int(r.Entries()))
	for i := range r.Entries() {
		if got[uint64(i)]&unix.POLLIN == 0 {
			t.Errorf("poll %d: result %#x", i, got[uint64(i)])
		}
	}
	if _, err := r.PrepCmd(p[0], 1, nil, 0, 1); err == nil {
		t.Error("URING_CMD on a ring without SQE128 was accepted")
	}
}

const benchFileSize = 64 << 20

// offsetAt is a pseudo-random 4 KiB-aligned offset in the file.
func offsetAt(i uint64) int64 {
	i = i*0x9e3779b97f4a7c15 + 0x632be59bd9b4e019
	i ^= i >> 29
	return int64(i%(benchFileSize/4096)) * 4096
}

// BenchmarkImageIO: random 4 KiB O_DIRECT reads and writes on an image file
// at queue depth 1, 16 and 64, through the ring (one goroutine keeps QD
// requests in flight, batched submission) and through pread/pwrite (QD
// goroutines, each blocking an OS thread per call, what the engine did
// before).
func BenchmarkImageIO(b *testing.B) {
	f := benchImage(b, benchFileSize)
	fd := int(f.Fd())
	for _, write := range []bool{false, true} {
		rw := "read"
		if write {
			rw = "write"
		}
		for _, qd := range []int{1, 16, 64} {
			b.Run(fmt.Sprintf("%s/pread-pwrite/QD%d", rw, qd), func(b *testing.B) {
				var next atomic.Uint64
				var wg sync.WaitGroup
				b.SetBytes(4096)
				b.ResetTimer()
				for range qd {
					buf := alignedBuf(4096)
					wg.Go(func() {
						for {
							i := next.Add(1)
							if i > uint64(b.N) {
								return
							}
							var err error
							if write {
								_, err = unix.Pwrite(fd, buf, offsetAt(i))
							} else {
								_, err = unix.Pread(fd, buf, offsetAt(i))
							}
							if err != nil {
								b.Error(err)
								return
							}
						}
					})
				}
				wg.Wait()
			})
			b.Run(fmt.Sprintf("%s/io_uring/QD%d", rw, qd), func(b *testing.B) {
				r := newRing(b, uint32(qd), SingleIssuer|DeferTaskrun)
				prep := r.PrepRead
				if write {
					prep = r.PrepWrite
				}
				bufs := make([][]byte, qd)
				for i := range bufs {
					bufs[i] = alignedBuf(4096)
				}
				b.SetBytes(4096)
				b.ResetTimer()
				issued, done := 0, 0
				for ; issued < min(qd, b.N); issued++ {
					_ = prep(fd, bufs[issued], offsetAt(uint64(issued)), uint64(issued))
				}
				var failed int32
				for done < b.N {
					if err := r.SubmitAndWait(); err != nil {
						b.Fatal(err)
					}
					r.Reap(func(u uint64, res int32) {
						done++
						if res != 4096 {
							failed = res
						}
						if issued < b.N {
							_ = prep(fd, bufs[u], offsetAt(uint64(issued)), u)
							issued++
						}
					})
					if failed != 0 {
						b.Fatalf("result %d", failed)
					}
				}
			})
		}
	}
}
