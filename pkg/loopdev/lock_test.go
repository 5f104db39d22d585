package loopdev

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/csi-encdisk/csi-encdisk/pkg/imagelock"
)

// TestAttachLockedHoldsLock: the lock taken on the file a loop device was
// configured with lives as long as the loop device, not as long as the
// attaching process's descriptor (a plain volume stays locked across a
// node plugin restart), and goes with the detach.
func TestAttachLockedHoldsLock(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	img := filepath.Join(t.TempDir(), "plain.img")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	dev, err := AttachLocked(ctx, img, 512, false, func(f *os.File) error {
		return imagelock.Lock(f, imagelock.Write, imagelock.Holder("test loop", "plain"))
	})
	if err != nil {
		t.Fatal(err)
	}
	detached := false
	t.Cleanup(func() {
		if !detached {
			_ = Detach(context.Background(), dev.Path)
		}
	})
	if err := imagelock.CheckPath(img); !errors.Is(err, imagelock.ErrInUse) {
		t.Fatalf("lock after the attacher closed its descriptor: %v, want ErrInUse", err)
	}
	if _, err := AttachLocked(ctx, img, 512, false, func(f *os.File) error { return imagelock.Lock(f, imagelock.Write, "") }); !errors.Is(err, imagelock.ErrInUse) {
		t.Fatalf("second locked attach: %v, want ErrInUse", err)
	}
	if err := Detach(ctx, dev.Path); err != nil {
		t.Fatal(err)
	}
	detached = true
	if err := imagelock.CheckPath(img); err != nil {
		t.Fatalf("lock after the detach: %v", err)
	}
}
