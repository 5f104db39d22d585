package e2e

import (
	"errors"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
)

// TestEngineIOErrorsDegraded: when the image under a live engine fails
// (here: cut short behind its back), reads through the volume fail with an
// error, never zeros, and the node reports the volume DEGRADED with the
// engine's I/O errors.
func TestEngineIOErrorsDegraded(t *testing.T) {
	dir := workDir(t)
	d := startDriver(t, dir)
	v := d.createVolume(t, "degraded", 32*mib, blockAccess, map[string]string{"encrypted": "true"}, "")
	d.stageAndPublish(t, v)
	if h := d.health(t, v); len(h) != 0 {
		t.Fatalf("healthy volume reports problems: %v", h)
	}
	img := d.imagePath(t, v.id())
	st, err := os.Stat(img)
	if err != nil {
		t.Fatal(err)
	}
	// Keep the header and the first MiB of data; the rest is gone.
	if err := os.Truncate(img, st.Size()-31*mib); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(v.TargetPath, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatalf("open published device: %v", err)
	}
	defer f.Close()
	buf := alignedBuf(64 << 10)
	_, err = f.ReadAt(buf, 16*mib)
	if err == nil {
		t.Fatal("a read past the cut image succeeded (it would have served zeros)")
	}
	if !errors.Is(err, syscall.EIO) {
		t.Logf("read error: %v", err)
	}
	var h []*csi.VolumeHealth_VolumeHealthEntry
	for deadline := time.Now().Add(10 * time.Second); ; {
		h = d.health(t, v)
		if len(h) > 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(h) == 0 || h[0].GetStatus() != csi.VolumeHealthErrorType_DEGRADED || h[0].GetMessage() == "" {
		t.Fatalf("health after I/O errors: %v, want DEGRADED with a message", h)
	}
	t.Logf("health after I/O errors: %s: %s", h[0].GetReason(), h[0].GetMessage())
	f.Close()
	// Grow the image back so the volume unstages normally.
	if err := os.Truncate(img, st.Size()); err != nil {
		t.Fatal(err)
	}
	d.unpublish(t, v)
	d.unstage(t, v)
}
