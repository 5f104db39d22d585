package fuseserve

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
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
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	m, dir, dev, sess, clones := mountMemFile(t, ctx, MountOptions{IOURing: true, MaxWrite: 128 << 10}, size, 1)
	if !sess.IOURing() {
		t.Fatalf("kernel did not take FUSE-over-io_uring (offered flags %#x)", sess.KernelFlags)
	}
	var stats Stats
	served := serveInProcess(ctx, dev, sess, newAsyncMem(m), ServeOptions{Clones: clones, Stats: &stats})

	path := filepath.Join(dir, FileName)
	f, _ := exerciseFile(t, path, m, size, 16, 100)
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
