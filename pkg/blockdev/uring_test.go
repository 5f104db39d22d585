package blockdev

import (
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"testing"

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
		tb.Skip(err)
	}
	tb.Cleanup(func() { f.Close(); os.Remove(f.Name()) })
	// Written, not only allocated: reads of unwritten extents do no I/O.
	chunk := make([]byte, 1<<20)
	for i := range chunk {
		chunk[i] = byte(i)
	}
	for off := int64(0); off < size; off += int64(len(chunk)) {
		if _, err := f.WriteAt(chunk, off); err != nil {
			tb.Skip(err)
		}
	}
	if err := f.Sync(); err != nil {
		tb.Skip(err)
	}
	d, err := os.OpenFile(f.Name(), os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		tb.Skip(err)
	}
	tb.Cleanup(func() { d.Close() })
	return d
}

func TestURingReadWrite(t *testing.T) {
	f := benchImage(t, 1<<20)
	r, err := newURing(8, 0, true)
	if err != nil {
		t.Skipf("no io_uring: %v", err)
	}
	defer r.Close()
	w := alignedBuf(8192)
	for i := range w {
		w[i] = byte(i * 7)
	}
	rd := alignedBuf(8192)
	r.mu.Lock()
	if err := r.queueLocked(uringOpWrite, int(f.Fd()), w, 65536, 1); err != nil {
		t.Fatal(err)
	}
	if err := r.submitLocked(); err != nil {
		t.Fatal(err)
	}
	r.mu.Unlock()
	got := map[uint64]int32{}
	for len(got) < 1 {
		if err := r.waitEvent(); err != nil {
			t.Fatal(err)
		}
		r.reap(func(u uint64, res int32) { got[u] = res })
	}
	r.mu.Lock()
	if err := r.queueLocked(uringOpRead, int(f.Fd()), rd, 65536, 2); err != nil {
		t.Fatal(err)
	}
	if err := r.submitLocked(); err != nil {
		t.Fatal(err)
	}
	r.mu.Unlock()
	for len(got) < 2 {
		if err := r.wait(); err != nil {
			t.Fatal(err)
		}
		r.reap(func(u uint64, res int32) { got[u] = res })
	}
	if got[1] != 8192 || got[2] != 8192 {
		t.Fatalf("results %v", got)
	}
	for i := range rd {
		if rd[i] != w[i] {
			t.Fatalf("byte %d: read %d, wrote %d", i, rd[i], w[i])
		}
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
				r, err := newURing(uint32(qd), 0, false)
				if err != nil {
					b.Skipf("no io_uring: %v", err)
				}
				defer r.Close()
				op := uint8(uringOpRead)
				if write {
					op = uringOpWrite
				}
				bufs := make([][]byte, qd)
				for i := range bufs {
					bufs[i] = alignedBuf(4096)
				}
				b.SetBytes(4096)
				b.ResetTimer()
				issued, done := 0, 0
				r.mu.Lock()
				defer r.mu.Unlock()
				for ; issued < min(qd, b.N); issued++ {
					_ = r.queueLocked(op, fd, bufs[issued], offsetAt(uint64(issued)), uint64(issued))
				}
				var failed int32
				for done < b.N {
					if err := r.submitLocked(); err != nil {
						b.Fatal(err)
					}
					if err := r.wait(); err != nil {
						b.Fatal(err)
					}
					r.reap(func(u uint64, res int32) {
						done++
						if res != 4096 {
							failed = res
						}
						if issued < b.N {
							_ = r.queueLocked(op, fd, bufs[u], offsetAt(uint64(issued)), u)
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
