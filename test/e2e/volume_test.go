package e2e

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
)

const mib = 1 << 20

// newMarker returns a random, recognisable byte string.
func newMarker(t *testing.T) []byte {
	t.Helper()
	b := make([]byte, 24)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return []byte("E2E-MARKER-" + hex.EncodeToString(b))
}

// writeMarker writes the marker into a file on the mounted volume and makes
// it durable (fsync of the file and syncfs of the filesystem).
func writeMarker(t *testing.T, dir string, marker []byte) {
	t.Helper()
	p := filepath.Join(dir, "marker")
	f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat(append(marker, '\n'), 64)
	if _, err := f.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatalf("fsync marker: %v", err)
	}
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		t.Fatalf("syncfs: %v", err)
	}
	f.Close()
}

func readMarker(t *testing.T, dir string, marker []byte) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "marker"))
	if err != nil {
		t.Fatalf("read marker back: %v", err)
	}
	if want := bytes.Repeat(append(marker, '\n'), 64); !bytes.Equal(b, want) {
		t.Fatalf("marker file differs: got %d bytes, want %d", len(b), len(want))
	}
}

// TestEncryptedVolumeLifecycle: a marker written through an encrypted
// volume never reaches the image in plaintext (it does for an unencrypted
// one), survives unstage and stage, and reads back from a volume restored
// from a snapshot (the key is inherited).
func TestEncryptedVolumeLifecycle(t *testing.T) {
	dir := workDir(t)
	d := startDriver(t, dir)

	enc := d.createVolume(t, "enc", 64*mib, "ext4", map[string]string{"encrypted": "true"}, "")
	plain := d.createVolume(t, "plain", 64*mib, "ext4", map[string]string{"encrypted": "false"}, "")
	marker := newMarker(t)
	plainMarker := newMarker(t)

	d.stageAndPublish(t, enc)
	d.stageAndPublish(t, plain)
	writeMarker(t, enc.TargetPath, marker)
	writeMarker(t, plain.TargetPath, plainMarker)

	encImage := d.imagePath(t, enc.id())
	plainImage := d.imagePath(t, plain.id())
	if fileContains(t, encImage, marker) {
		t.Fatalf("the plaintext marker is in the encrypted image %s", encImage)
	}
	if !fileContains(t, plainImage, plainMarker) {
		t.Fatalf("the marker is not in the unencrypted image %s: the check would not see plaintext", plainImage)
	}
	// The image starts with a LUKS2 header that cryptsetup accepts.
	run(t, "cryptsetup", "isLuks", "--type", "luks2", encImage)

	d.unpublish(t, enc)
	d.unstage(t, enc)
	if _, err := os.Stat(filepath.Join(enc.StagingPath, "marker")); err == nil {
		t.Fatal("marker still visible at the staging path after unstage")
	}
	d.stageAndPublish(t, enc)
	readMarker(t, enc.TargetPath, marker)

	// The same with 512-byte encryption sectors.
	enc512 := d.createVolume(t, "enc512", 64*mib, "ext4", map[string]string{"encrypted": "true", "sectorSize": "512"}, "")
	d.stageAndPublish(t, enc512)
	writeMarker(t, enc512.TargetPath, marker)
	if img := d.imagePath(t, enc512.id()); fileContains(t, img, marker) {
		t.Fatalf("the plaintext marker is in the 512-byte-sector image %s", img)
	}
	d.unpublish(t, enc512)
	d.unstage(t, enc512)
	d.stageAndPublish(t, enc512)
	readMarker(t, enc512.TargetPath, marker)
	d.unpublish(t, enc512)
	d.unstage(t, enc512)

	// Snapshot the staged volume, restore into a new volume, read the marker.
	snap, err := d.ctrl.CreateSnapshot(ctxT(t), &csi.CreateSnapshotRequest{SourceVolumeId: enc.id(), Name: "enc-snap"})
	if err != nil {
		t.Fatalf("CreateSnapshot: %v", err)
	}
	snapID := snap.GetSnapshot().GetSnapshotId()
	t.Cleanup(func() {
		if d.conn != nil {
			_, _ = d.ctrl.DeleteSnapshot(ctxT(t), &csi.DeleteSnapshotRequest{SnapshotId: snapID})
		}
	})
	restored := d.createVolume(t, "restored", 64*mib, "ext4", map[string]string{"encrypted": "true"}, snapID)
	if restored.Volume.GetVolumeContext()["encrypted"] != "true" {
		t.Fatalf("restored volume context %v does not say encrypted", restored.Volume.GetVolumeContext())
	}
	d.stageAndPublish(t, restored)
	readMarker(t, restored.TargetPath, marker)
	if img := d.imagePath(t, restored.id()); fileContains(t, img, marker) {
		t.Fatalf("the plaintext marker is in the restored image %s", img)
	}

	for _, v := range []*volume{enc, plain, restored} {
		d.unpublish(t, v)
		d.unstage(t, v)
	}
	if m := mountsUnder(dir); len(m) != 0 {
		t.Fatalf("mounts left after unstage: %v", m)
	}
	if l := loopsUnder(dir); len(l) != 0 {
		t.Fatalf("loop devices left after unstage: %v", l)
	}
}
