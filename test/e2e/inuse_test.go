package e2e

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
)

// TestDeleteInUseThenShred: DeleteVolume of a staged and published
// encrypted volume is FailedPrecondition "volume in use" and changes
// nothing (the pod keeps reading its data); after unpublish and unstage it
// succeeds, and the image's own inode (kept by a hard link) then holds
// neither a LUKS2 header nor any 512-byte piece of its keyslot area: it
// was crypto-shredded before it was removed.
func TestDeleteInUseThenShred(t *testing.T) {
	dir := workDir(t)
	d := startDriver(t, dir)
	v := d.createVolume(t, "busy", 64*mib, "ext4", map[string]string{"encrypted": "true"}, "")
	d.stageAndPublish(t, v)
	marker := newMarker(t)
	writeMarker(t, v.TargetPath, marker)

	_, err := d.ctrl.DeleteVolume(ctxT(t), &csi.DeleteVolumeRequest{VolumeId: v.id()})
	if status.Code(err) != codes.FailedPrecondition || !bytes.Contains([]byte(status.Convert(err).Message()), []byte("volume in use")) {
		t.Fatalf("DeleteVolume of a published volume: %v, want FailedPrecondition \"volume in use\"", err)
	}
	img := d.imagePath(t, v.id())
	f, err := os.Open(img)
	if err != nil {
		t.Fatalf("image gone after a refused delete: %v", err)
	}
	h, err := crypt.ReadHeader(f)
	if err != nil {
		t.Fatalf("header unreadable after a refused delete: %v", err)
	}
	area := make([]byte, 256000) // 64-byte key x 4000 AF stripes
	if _, err := f.ReadAt(area, int64(2*h.HeaderSize())); err != nil {
		t.Fatal(err)
	}
	f.Close()
	readMarker(t, v.TargetPath, marker)

	kept := filepath.Join(dir, "kept-image")
	if err := os.Link(img, kept); err != nil {
		t.Fatal(err)
	}
	d.unpublish(t, v)
	d.unstage(t, v)
	if _, err := d.ctrl.DeleteVolume(ctxT(t), &csi.DeleteVolumeRequest{VolumeId: v.id()}); err != nil {
		t.Fatalf("DeleteVolume after unstage: %v", err)
	}
	if _, err := os.Stat(img); !os.IsNotExist(err) {
		t.Fatalf("image still there after DeleteVolume: %v", err)
	}
	data, err := os.ReadFile(kept)
	if err != nil {
		t.Fatal(err)
	}
	for off := 0; off+512 <= len(area); off += 512 {
		if bytes.Contains(data, area[off:off+512]) {
			t.Fatalf("the deleted image still holds keyslot bytes %d-%d: not shredded before removal", off, off+512)
		}
	}
	kf, err := os.Open(kept)
	if err != nil {
		t.Fatal(err)
	}
	defer kf.Close()
	if _, err := crypt.ReadHeader(kf); err == nil {
		t.Fatal("the deleted image still has a readable LUKS2 header")
	}
}
