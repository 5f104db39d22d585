package blockdev

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// newPlainImage writes an image file of size random bytes (no header) and
// returns its path and contents.
func newPlainImage(t *testing.T, size int) (string, []byte) {
	t.Helper()
	img := filepath.Join(t.TempDir(), "plain.img")
	data := make([]byte, size)
	rand.Read(data)
	if err := os.WriteFile(img, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return img, data
}

func plainSpec(img string, sectorSize int) EngineSpec {
	return EngineSpec{VolumeID: "plain-" + filepath.Base(filepath.Dir(img)), Image: img,
		RunDir: filepath.Join(filepath.Dir(img), "run"), Plaintext: true, SectorSize: sectorSize}
}

// An engine in plaintext mode serves the image's bytes as they are, from
// offset 0, through its fast path (the image's io_uring) and through a
// loop device on its file; what is written lands in the image unchanged;
// its report claims no key and no KMS call; a discard punches a hole that
// reads back as zeros.
func TestPlaintextEngineServesImageAsIs(t *testing.T) {
	requireRoot(t)
	for _, ss := range []int{4096, 512} {
		t.Run(fmt.Sprint(ss), func(t *testing.T) {
			const size = 16 << 20
			img, data := newPlainImage(t, size)
			spec := plainSpec(img, ss)
			t.Setenv(engineEnv, "1")
			eng, rep, err := StartEngine(context.Background(), os.Args[0], spec)
			os.Unsetenv(engineEnv)
			if err != nil {
				t.Fatalf("StartEngine: %v", err)
			}
			t.Cleanup(func() {
				if err := UnmountEngine(context.Background(), spec.RunDir); err != nil {
					t.Errorf("UnmountEngine: %v", err)
				}
				waitGone(t, eng.PID)
			})
			if !rep.Plaintext || rep.DataOffset != 0 || rep.SectorSize != ss || rep.Size != size || len(rep.KMSCalls) != 0 || rep.Error != "" {
				t.Fatalf("start report %+v: want plaintext, offset 0, sector size %d, size %d, no KMS call", rep, ss, size)
			}
			if eng.DataOffset != 0 || eng.SectorSize != ss {
				t.Fatalf("engine geometry %d/%d", eng.DataOffset, eng.SectorSize)
			}
			if log, _ := os.ReadFile(filepath.Join(spec.RunDir, LogFileName)); !bytes.Contains(log, []byte(`plaintext=true`)) {
				t.Errorf("engine log does not say it serves in plaintext:\n%s", log)
			}

			// Through the FUSE file (the engine's fast path).
			f, err := os.Open(eng.File)
			if err != nil {
				t.Fatal(err)
			}
			got, err := readAllAt(f, size)
			f.Close()
			if err != nil || !bytes.Equal(got, data) {
				t.Fatalf("the FUSE file differs from the image's bytes (err %v)", err)
			}

			// Through a loop device, O_DIRECT: a write lands unchanged.
			dev := attach(t, eng.File, ss)
			d, err := os.OpenFile(dev, os.O_RDWR|unix.O_DIRECT, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			const off = 5<<20 + 8192
			buf, back := alignedBuf(1<<20), alignedBuf(1<<20)
			copy(buf, bytes.Repeat([]byte("PLAIN-csi-encdisk-"), 1<<16))
			if _, err := d.WriteAt(buf, off); err != nil {
				t.Fatal(err)
			}
			if err := d.Sync(); err != nil {
				t.Fatal(err)
			}
			if _, err := d.ReadAt(back, off); err != nil || !bytes.Equal(back, buf) {
				t.Fatalf("read back through the loop device differs (err %v)", err)
			}
			imgNow, err := os.ReadFile(img)
			if err != nil {
				t.Fatal(err)
			}
			copy(data[off:], buf)
			if !bytes.Equal(imgNow, data) {
				t.Fatal("the image does not hold exactly what was written, at the offset written")
			}

			// A discard (fallocate PUNCH_HOLE on the file) makes a hole
			// that reads back as zeros through the engine.
			ff, err := os.OpenFile(eng.File, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer ff.Close()
			if err := unix.Fallocate(int(ff.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 1<<20, 1<<20); err != nil {
				t.Fatalf("punch a hole through a plaintext engine: %v", err)
			}
			z := make([]byte, 1<<20)
			if _, err := ff.ReadAt(z, 1<<20); err != nil || !bytes.Equal(z, make([]byte, 1<<20)) {
				t.Fatalf("a punched range does not read back as zeros (err %v)", err)
			}
			st, err := DialControl(eng.ControlSocket).Stats(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if st.IOErrors != 0 || st.Size != size || st.WriteBytes < 1<<20 {
				t.Errorf("stats %+v", st)
			}
		})
	}
}

func readAllAt(f *os.File, n int) ([]byte, error) {
	b := make([]byte, n)
	_, err := f.ReadAt(b, 0)
	return b, err
}

// The mode is the caller's, and the engine confirms it: an image with a
// LUKS2 header is never served in plaintext (ErrEncryptionMismatch, nothing
// left behind), and the image is not touched.
func TestPlaintextEngineRefusesEncryptedImage(t *testing.T) {
	requireRoot(t)
	v := newTestVolume(t, 8<<20, 4096, true)
	before, err := os.ReadFile(v.image)
	if err != nil {
		t.Fatal(err)
	}
	spec := EngineSpec{VolumeID: "mismatch", Image: v.image, RunDir: v.runDir, Plaintext: true, SectorSize: 4096}
	t.Setenv(engineEnv, "1")
	_, rep, err := StartEngine(context.Background(), os.Args[0], spec)
	if !errors.Is(err, ErrEncryptionMismatch) || !strings.Contains(err.Error(), "LUKS2 header") {
		t.Fatalf("plaintext engine on a LUKS2 image: %v, want ErrEncryptionMismatch", err)
	}
	if rep == nil || rep.Plaintext || rep.Reason != reasonModeMismatch {
		t.Fatalf("report %+v", rep)
	}
	assertClean(t, v.runDir)
	if after, _ := os.ReadFile(v.image); !bytes.Equal(before, after) {
		t.Fatal("the refused engine changed the image")
	}
}

// The plain cipher passes bytes through, in place or into another buffer.
func TestPlainCipher(t *testing.T) {
	src := []byte("0123456789abcdef")
	dst := make([]byte, len(src))
	plainCipher{}.EncryptSectors(dst, src, 7)
	if !bytes.Equal(dst, src) {
		t.Fatal("EncryptSectors changed the bytes")
	}
	clear(dst)
	plainCipher{}.DecryptSectors(dst, src, 7)
	if !bytes.Equal(dst, src) {
		t.Fatal("DecryptSectors changed the bytes")
	}
	plainCipher{}.DecryptSectors(src, src, 0)
	if string(src) != "0123456789abcdef" {
		t.Fatal("in place changed the bytes")
	}
}
