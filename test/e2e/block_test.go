package e2e

import (
	"bytes"
	"crypto/rand"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"unsafe"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
)

// alignedBuf returns a buffer aligned for O_DIRECT.
func alignedBuf(size int) []byte {
	b := make([]byte, size+4096)
	off := 4096 - int(uintptr(unsafe.Pointer(&b[0]))&4095)
	if off == 4096 {
		off = 0
	}
	return b[off : off+size]
}

// fillDevice writes size bytes of random data with O_DIRECT and returns them.
func fillDevice(t *testing.T, dev string, size int) []byte {
	t.Helper()
	f, err := os.OpenFile(dev, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatalf("open %s: %v", dev, err)
	}
	defer f.Close()
	data := make([]byte, size)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	buf := alignedBuf(mib)
	for off := 0; off < size; off += mib {
		copy(buf, data[off:off+mib])
		if _, err := f.WriteAt(buf, int64(off)); err != nil {
			t.Fatalf("write %s at %d: %v", dev, off, err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatalf("fsync %s: %v", dev, err)
	}
	return data
}

// checkDevice reads the device with O_DIRECT and compares it with want.
func checkDevice(t *testing.T, dev string, want []byte) {
	t.Helper()
	f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatalf("open %s: %v", dev, err)
	}
	defer f.Close()
	buf := alignedBuf(mib)
	for off := 0; off < len(want); off += mib {
		if _, err := f.ReadAt(buf, int64(off)); err != nil {
			t.Fatalf("read %s at %d: %v", dev, off, err)
		}
		if !bytes.Equal(buf, want[off:off+mib]) {
			t.Fatalf("%s: data at offset %d differs from what was written", dev, off)
		}
	}
}

// dataSegmentHoles reports whether the image has a hole after dataOffset.
func dataSegmentHoles(t *testing.T, image string, dataOffset int64) bool {
	t.Helper()
	f, err := os.Open(image)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	hole, err := unix.Seek(int(f.Fd()), dataOffset, unix.SEEK_HOLE)
	if err != nil {
		t.Fatalf("SEEK_HOLE on %s: %v", image, err)
	}
	return hole < fi.Size()
}

// TestRawBlockEncrypted publishes encrypted raw block volumes, writes and
// reads through the published device, runs mkfs.ext4 (with its discards)
// and e2fsck on it, and checks the image: without allowDiscards the data
// segment has no holes; with it, discards become holes that still read back
// as a clean filesystem.
func TestRawBlockEncrypted(t *testing.T) {
	dir := workDir(t)
	d := startDriver(t, dir)
	const size = 64 * mib

	for _, discards := range []bool{false, true} {
		name := "block-discards-" + strconv.FormatBool(discards)
		t.Run(name, func(t *testing.T) {
			v := d.createVolume(t, name, size, blockAccess, map[string]string{
				"encrypted": "true", "allowDiscards": strconv.FormatBool(discards)}, "")
			d.stageAndPublish(t, v)
			fi, err := os.Stat(v.TargetPath)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode()&os.ModeDevice == 0 {
				t.Fatalf("published target %s is not a block device (mode %v)", v.TargetPath, fi.Mode())
			}
			data := fillDevice(t, v.TargetPath, size)
			checkDevice(t, v.TargetPath, data)
			image := d.imagePath(t, v.id())
			dataOffset := d.dataOffset(t, v.id())
			if fileContains(t, image, data[5*mib:5*mib+4096]) {
				t.Fatal("plaintext written to the raw device is in the image")
			}

			// Unstage and stage again: the data comes back through a new engine.
			d.unpublish(t, v)
			d.unstage(t, v)
			d.stageAndPublish(t, v)
			checkDevice(t, v.TargetPath, data)

			run(t, "mkfs.ext4", "-q", "-F", v.TargetPath)
			mnt := filepath.Join(dir, "mnt-"+name)
			if err := os.MkdirAll(mnt, 0o755); err != nil {
				t.Fatal(err)
			}
			run(t, "mount", "-t", "ext4", v.TargetPath, mnt)
			payload := make([]byte, 8*mib)
			_, _ = rand.Read(payload)
			if err := os.WriteFile(filepath.Join(mnt, "payload"), payload, 0o644); err != nil {
				t.Fatal(err)
			}
			run(t, "umount", mnt)
			run(t, "e2fsck", "-fn", v.TargetPath)

			d.unpublish(t, v)
			d.unstage(t, v)
			holes := dataSegmentHoles(t, image, dataOffset)
			if !discards && holes {
				t.Fatalf("image %s has holes in its data segment although allowDiscards is off", image)
			}
			if discards && !holes {
				t.Fatalf("image %s has no holes although allowDiscards is on and mkfs.ext4 discarded the device", image)
			}
		})
	}
}

// TestRawBlockReadOnly stages an encrypted raw block volume with a
// read-only access mode: its data reads back and writes are refused.
func TestRawBlockReadOnly(t *testing.T) {
	dir := workDir(t)
	d := startDriver(t, dir)
	const size = 16 * mib
	v := d.createVolume(t, "ro", size, blockAccess, map[string]string{"encrypted": "true"}, "")
	d.stageAndPublish(t, v)
	data := fillDevice(t, v.TargetPath, size)
	d.unpublish(t, v)
	d.unstage(t, v)

	v.Capability.AccessMode.Mode = csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY
	d.stageAndPublish(t, v)
	checkDevice(t, v.TargetPath, data)
	f, err := os.OpenFile(v.TargetPath, os.O_WRONLY|unix.O_DIRECT, 0)
	if err == nil {
		buf := alignedBuf(4096)
		_, err = f.WriteAt(buf, 0)
		f.Close()
	}
	if err == nil {
		t.Fatal("a write to a read-only raw block volume succeeded")
	}
	t.Logf("write to the read-only volume refused: %v", err)
	d.unpublish(t, v)
	d.unstage(t, v)
}
