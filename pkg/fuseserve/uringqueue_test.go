package fuseserve

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// enableURing turns on the fuse module's enable_uring (this machine kind's
// kernel has FUSE-over-io_uring; the parameter defaults to off). It stays
// on: other packages' tests may run at the same time, and it only lets a
// server ask for rings.
func enableURing(t *testing.T) {
	t.Helper()
	if err := EnableIOURing(); err != nil {
		t.Fatal(err)
	}
}

// TestURingThroughTheKernel serves a memory file over FUSE-over-io_uring:
// large and small, concurrent reads and writes come back right, other
// requests work (they come on the rings too), and an unmount ends Serve.
func TestURingThroughTheKernel(t *testing.T) {
	requireRoot(t)
	enableURing(t)
	const size = 16 << 20
	m := &memFile{data: make([]byte, size)}
	m.size.Store(size)
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	dev, sess, err := Mount(ctx, dir, MountOptions{IOURing: true, MaxWrite: 128 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	defer func() { _ = unix.Unmount(dir, unix.MNT_DETACH) }()
	if !sess.IOURing() {
		t.Fatalf("kernel did not take FUSE-over-io_uring (offered flags %#x)", sess.KernelFlags)
	}
	clones, err := Clones(dev, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer clones[0].Close()
	var stats Stats
	served := serveInProcess(ctx, dev, sess, newAsyncMem(m), ServeOptions{Clones: clones, Stats: &stats})

	path := filepath.Join(dir, FileName)
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
	for g := range 16 {
		wg.Go(func() {
			b, c := aligned(4096), aligned(4096)
			for i := range 100 {
				off := int64((g*100+i)%1024) * 4096
				for j := range b {
					b[j] = byte(g + i + j)
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
	if st, err := os.Stat(path); err != nil || st.Size() != size {
		t.Errorf("stat: %v %v", st, err)
	}
	f.Close()
	if stats.Ring.Load() < 3200 || stats.ReplyFailures.Load() != 0 || stats.Errors.Load() != 1 {
		t.Errorf("stats: %d requests on the rings (of %d), %d reply failures, %d errors (want the one ENOSPC)",
			stats.Ring.Load(), stats.Requests.Load(), stats.ReplyFailures.Load(), stats.Errors.Load())
	}
	if err := Unmount(dir); err != nil {
		t.Fatal(err)
	}
	if err := wait(t, served); err != nil {
		t.Errorf("Serve after unmount: %v", err)
	}
}
