package blockdev

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
	"github.com/csi-encdisk/csi-encdisk/pkg/filesystem"
	"github.com/csi-encdisk/csi-encdisk/pkg/fuseserve"
	"github.com/csi-encdisk/csi-encdisk/pkg/imagelock"
	"github.com/csi-encdisk/csi-encdisk/pkg/loopdev"
	"github.com/csi-encdisk/csi-encdisk/pkg/mounts"
)

// loopAttach attaches file to a loop device and returns its path.
func loopAttach(ctx context.Context, file string, sectorSize int, readOnly bool) (string, error) {
	d, err := loopdev.Attach(ctx, file, sectorSize, readOnly)
	if err != nil {
		return "", err
	}
	return d.Path, nil
}

// loopOf returns the loop device backed by file, "" if none is.
func loopOf(file string) (string, error) {
	dev, ino, err := loopdev.BackingOf(file)
	if err != nil {
		return "", err
	}
	return loopdev.FindByBacking(dev, ino)
}

var execLookPath = exec.LookPath

// testVolume is a LUKS2 image with a known volume key.
type testVolume struct {
	image      string
	key        []byte
	passFile   string // holds the keyslot's passphrase ("test passphrase")
	dataOffset int64
	sectorSize int
	runDir     string
}

func newTestVolume(t *testing.T, dataSize int64, sectorSize int, fill bool) *testVolume {
	t.Helper()
	dir := t.TempDir()
	v := &testVolume{image: filepath.Join(dir, "vol.img"), key: make([]byte, 64), sectorSize: sectorSize,
		runDir: filepath.Join(dir, "run"), passFile: filepath.Join(dir, "pass")}
	rand.Read(v.key)
	if err := os.WriteFile(v.passFile, []byte(testPassphrase), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(v.image, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h, err := crypt.Format(f, dataSize, crypt.FormatOptions{SectorSize: sectorSize, VolumeKey: v.key, Passphrase: []byte(testPassphrase)})
	if err != nil {
		t.Fatalf("format: %v", err)
	}
	v.dataOffset = h.DataOffset()
	if fill { // no holes in the data segment to begin with
		chunk := make([]byte, 1<<20)
		for off := int64(0); off < dataSize; off += int64(len(chunk)) {
			rand.Read(chunk)
			if _, err := f.WriteAt(chunk[:min(int64(len(chunk)), dataSize-off)], v.dataOffset+off); err != nil {
				t.Fatal(err)
			}
		}
	}
	return v
}

func (v *testVolume) spec(discards bool) EngineSpec {
	return EngineSpec{VolumeID: "test-" + filepath.Base(filepath.Dir(v.image)), Image: v.image,
		PassphraseFile: v.passFile, AllowDiscards: discards, RunDir: v.runDir}
}

// start runs an engine (the test binary in engine mode) and tears it down
// at the end of the test in the right order, whatever happened.
func (v *testVolume) start(t *testing.T, spec EngineSpec) *Engine {
	t.Helper()
	t.Setenv(engineEnv, "1")
	eng, rep, err := StartEngine(context.Background(), os.Args[0], spec)
	os.Unsetenv(engineEnv)
	if err != nil {
		t.Fatalf("StartEngine: %v", err)
	}
	if eng.DataOffset != v.dataOffset || eng.SectorSize != v.sectorSize || rep.DataOffset != v.dataOffset {
		t.Fatalf("engine geometry %d/%d (report %+v), header %d/%d", eng.DataOffset, eng.SectorSize, rep, v.dataOffset, v.sectorSize)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := UnmountEngine(ctx, spec.RunDir); err != nil {
			t.Errorf("UnmountEngine: %v", err)
			syscall.Kill(eng.PID, syscall.SIGKILL)
			cleanupDeadEngine(spec.RunDir)
		}
		waitGone(t, eng.PID)
	})
	return eng
}

func waitGone(t *testing.T, pid int) {
	t.Helper()
	for i := 0; i < 500; i++ {
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			return
		}
		var ws syscall.WaitStatus
		syscall.Wait4(pid, &ws, syscall.WNOHANG, nil)
		time.Sleep(10 * time.Millisecond)
	}
	t.Errorf("process %d still alive", pid)
}

// attach attaches a loop device and detaches it at cleanup (registered after
// the engine's cleanup, so it runs first).
func attach(t *testing.T, file string, sectorSize int) string {
	t.Helper()
	dev, err := loopAttach(context.Background(), file, sectorSize, false)
	if err != nil {
		t.Fatalf("LoopAttach: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := loopdev.Detach(ctx, dev); err != nil {
			t.Errorf("LoopDetach: %v", err)
		}
	})
	return dev
}

func mountTmp(t *testing.T, dev string) string {
	t.Helper()
	mnt := t.TempDir()
	if err := mounts.Mount(context.Background(), dev, mnt, "ext4", nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := mounts.Unmount(context.Background(), mnt); err != nil {
			t.Errorf("unmount: %v", err)
			unix.Unmount(mnt, unix.MNT_DETACH)
		}
	})
	return mnt
}

func readImage(t *testing.T, v *testVolume, off int64, n int) []byte {
	t.Helper()
	f, err := os.Open(v.image)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, v.dataOffset+off); err != nil {
		t.Fatal(err)
	}
	return b
}

// opensslDecrypt decrypts ct sector by sector with python3's cryptography
// (OpenSSL EVP aes-256-xts), IV = little-endian sector number in 512-byte units.
func opensslDecrypt(t *testing.T, key, ct []byte, sectorSize int, first512 int64) []byte {
	t.Helper()
	const prog = `
import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
ss = int(sys.argv[1]); first = int(sys.argv[2])
data = sys.stdin.buffer.read(); key, ct = data[:64], data[64:]; out = bytearray()
for i in range(0, len(ct), ss):
    iv = (first + i // 512).to_bytes(16, "little")
    d = Cipher(algorithms.AES(key), modes.XTS(iv)).decryptor()
    out += d.update(ct[i:i+ss]) + d.finalize()
sys.stdout.buffer.write(out)
`
	// The (test) key goes on stdin, not argv.
	cmd := exec.Command("python3", "-c", prog, fmt.Sprint(sectorSize), fmt.Sprint(first512))
	cmd.Stdin = io.MultiReader(bytes.NewReader(key), bytes.NewReader(ct))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("python3 cryptography AES-XTS: %v: %s", err, stderr.String())
	}
	return out
}

func TestRoundTripThroughLoop(t *testing.T) {
	requireRoot(t, "python3")
	for _, ss := range []int{4096, 512} {
		t.Run(fmt.Sprint(ss), func(t *testing.T) {
			v := newTestVolume(t, 32<<20, ss, false)
			eng := v.start(t, v.spec(false))
			st, err := os.Stat(eng.File)
			if err != nil || st.Size() != 32<<20 {
				t.Fatalf("plaintext file: %v, size %d, want %d", err, st.Size(), 32<<20)
			}
			dev := attach(t, eng.File, ss)
			if b, _ := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop", "dio")); strings.TrimSpace(string(b)) != "1" {
				t.Errorf("loop direct I/O = %q, want 1", b)
			}
			if b, _ := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "queue/logical_block_size")); strings.TrimSpace(string(b)) != fmt.Sprint(ss) {
				t.Errorf("loop logical block size = %q, want %d", b, ss)
			}
			if found, err := loopOf(eng.File); err != nil || found != dev {
				t.Errorf("LoopFindByFile = %q, %v; want %s", found, err, dev)
			}

			// O_DIRECT on the device so the read back reaches the engine.
			plain, got := alignedBuf(1<<20), alignedBuf(1<<20)
			copy(plain, bytes.Repeat([]byte("MARKER-csi-encdisk-roundtrip-"), 40000))
			const off = 3<<20 + 8192
			d, err := os.OpenFile(dev, os.O_RDWR|unix.O_DIRECT, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			if _, err := d.WriteAt(plain, off); err != nil {
				t.Fatal(err)
			}
			if err := d.Sync(); err != nil {
				t.Fatal(err)
			}
			if _, err := d.ReadAt(got, off); err != nil || !bytes.Equal(got, plain) {
				t.Fatalf("read back through the loop device differs (err %v)", err)
			}
			// The image holds exactly dm-crypt's ciphertext: XTS at tweak = offset/512.
			x, err := crypt.NewXTS(v.key, ss)
			if err != nil {
				t.Fatal(err)
			}
			want := make([]byte, len(plain))
			x.EncryptSectors(want, plain, off/512)
			if ct := readImage(t, v, off, len(plain)); !bytes.Equal(ct, want) {
				t.Fatal("image ciphertext differs from XTS of the plaintext at tweak offset/512")
			}
			// Independent oracle: OpenSSL's AES-XTS (Python cryptography) with
			// dm-crypt's plain64 IV, the sector's offset in 512-byte units.
			if pt := opensslDecrypt(t, v.key, readImage(t, v, off, len(plain)), ss, off/512); !bytes.Equal(pt, plain) {
				t.Fatal("OpenSSL AES-XTS with plain64 IVs does not decrypt the image to the plaintext")
			}
			img, err := os.ReadFile(v.image)
			if err != nil {
				t.Fatal(err)
			}
			if bytes.Contains(img, []byte("MARKER-csi-encdisk")) {
				t.Fatal("plaintext marker found in the image")
			}
			s, err := DialControl(eng.ControlSocket).Stats(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if s.WriteBytes < uint64(len(plain)) || s.ReadBytes < uint64(len(plain)) || s.IOErrors != 0 || s.Size != 32<<20 {
				t.Errorf("stats %+v", s)
			}
		})
	}
}

func TestMisalignedIOAndFallocate(t *testing.T) {
	requireRoot(t)
	for _, discards := range []bool{false, true} {
		t.Run(fmt.Sprintf("discards=%v", discards), func(t *testing.T) {
			v := newTestVolume(t, 8<<20, 4096, true)
			eng := v.start(t, v.spec(discards))
			f, err := os.OpenFile(eng.File, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			pattern := bytes.Repeat([]byte{0xA5}, 3*4096)
			if _, err := f.WriteAt(pattern, 4096); err != nil {
				t.Fatal(err)
			}
			before := readImage(t, v, 0, 5*4096)
			for _, c := range []struct {
				off int64
				n   int
			}{{4096 + 100, 4096}, {4096, 100}, {8192 - 512, 4096}} {
				if _, err := f.WriteAt(make([]byte, c.n), c.off); !errors.Is(err, syscall.EINVAL) {
					t.Errorf("write %d@%d: %v, want EINVAL", c.n, c.off, err)
				}
				if _, err := f.ReadAt(make([]byte, c.n), c.off); !errors.Is(err, syscall.EINVAL) {
					t.Errorf("read %d@%d: %v, want EINVAL", c.n, c.off, err)
				}
			}
			if !bytes.Equal(readImage(t, v, 0, 5*4096), before) {
				t.Fatal("misaligned writes changed the image")
			}
			got := make([]byte, len(pattern))
			if _, err := f.ReadAt(got, 4096); err != nil || !bytes.Equal(got, pattern) {
				t.Fatalf("neighbours changed: %v", err)
			}

			err = unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 8192, 4096)
			if !discards {
				if !errors.Is(err, syscall.EOPNOTSUPP) {
					t.Fatalf("punch hole without discards: %v, want EOPNOTSUPP", err)
				}
				if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_ZERO_RANGE, 8192, 4096); !errors.Is(err, syscall.EOPNOTSUPP) {
					t.Fatalf("zero range without discards: %v, want EOPNOTSUPP", err)
				}
				if !bytes.Equal(readImage(t, v, 0, 5*4096), before) {
					t.Fatal("refused fallocate changed the image")
				}
				return
			}
			if err != nil {
				t.Fatalf("punch hole with discards: %v", err)
			}
			if _, err := f.ReadAt(got, 4096); err != nil {
				t.Fatal(err)
			}
			want := append(append(bytes.Clone(pattern[:4096]), make([]byte, 4096)...), pattern[:4096]...)
			if !bytes.Equal(got, want) {
				t.Fatal("punched sector does not read as zeros, or its neighbours changed")
			}
			if !bytes.Equal(readImage(t, v, 8192, 4096), make([]byte, 4096)) {
				t.Fatal("image not zero where the hole was punched")
			}
			if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 8192+512, 4096); !errors.Is(err, syscall.EINVAL) {
				t.Fatalf("misaligned punch: %v, want EINVAL", err)
			}
		})
	}
}

// firstHole returns the first hole at or after off in file (its size if none).
func firstHole(t *testing.T, file string, off int64) int64 {
	t.Helper()
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h, err := unix.Seek(int(f.Fd()), off, unix.SEEK_HOLE)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// TestExt4OnEngine: mkfs.ext4 (which discards the whole device) + mount +
// write + umount, then e2fsck -fn is clean. Without discards the image's
// data segment keeps no holes; with them mkfs's discard punched some and
// ext4 is still consistent (punched sectors read as zeros).
func TestExt4OnEngine(t *testing.T) {
	requireRoot(t, "mkfs.ext4", "e2fsck", "blkid", "mount")
	for _, discards := range []bool{false, true} {
		t.Run(fmt.Sprintf("discards=%v", discards), func(t *testing.T) { testExt4OnEngine(t, discards) })
	}
}

func testExt4OnEngine(t *testing.T, discards bool) {
	const size = 96 << 20
	v := newTestVolume(t, size, 4096, true)
	imgSize := v.dataOffset + size
	if h := firstHole(t, v.image, v.dataOffset); h != imgSize {
		t.Fatalf("prefilled image has a hole at %d", h)
	}
	eng := v.start(t, v.spec(discards))
	dev := attach(t, eng.File, 4096)
	ctx := context.Background()
	if fs, err := filesystem.Detect(ctx, dev); err != nil || fs != "" {
		t.Fatalf("DetectFilesystem on random data = %q, %v", fs, err)
	}
	if err := filesystem.Make(ctx, dev, "ext4"); err != nil {
		t.Fatal(err)
	}
	if fs, err := filesystem.Detect(ctx, dev); err != nil || fs != "ext4" {
		t.Fatalf("DetectFilesystem = %q, %v", fs, err)
	}
	if err := filesystem.Make(ctx, dev, "ext4"); err == nil {
		t.Fatal("MakeFilesystem over an existing filesystem succeeded")
	}
	mnt := t.TempDir()
	if err := mounts.Mount(ctx, dev, mnt, "ext4", nil); err != nil {
		t.Fatal(err)
	}
	mounted := true
	defer func() {
		if mounted {
			mounts.Unmount(ctx, mnt)
		}
	}()
	if ok, err := mounts.IsMountPoint(mnt); !ok || err != nil {
		t.Fatalf("IsMountPoint = %v, %v", ok, err)
	}
	data := bytes.Repeat([]byte("EXT4-MARKER-csi-encdisk "), 200000)
	if err := os.WriteFile(filepath.Join(mnt, "f"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	st, err := filesystem.Stats(mnt)
	if err != nil || st.UsedBytes < int64(len(data)) || st.TotalBytes < 80<<20 || st.UsedInodes == 0 {
		t.Fatalf("FilesystemStats = %+v, %v", st, err)
	}
	if err := mounts.Unmount(ctx, mnt); err != nil {
		t.Fatal(err)
	}
	mounted = false
	if ok, _ := mounts.IsMountPoint(mnt); ok {
		t.Fatal("still mounted")
	}
	if out, err := exec.Command("e2fsck", "-fn", dev).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn: %v\n%s", err, out)
	}
	h := firstHole(t, v.image, v.dataOffset)
	if !discards && h != imgSize {
		t.Fatalf("image data segment has a hole at %d without discards", h-v.dataOffset)
	}
	if discards && h == imgSize {
		t.Fatal("discard mode: mkfs.ext4's discard left no hole in the image")
	}
	img, err := os.ReadFile(v.image)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(img, []byte("EXT4-MARKER")) {
		t.Fatal("plaintext in the image")
	}
}

func TestKillEngineGivesErrors(t *testing.T) {
	requireRoot(t, "mkfs.ext4")
	v := newTestVolume(t, 64<<20, 4096, false)
	eng := v.start(t, v.spec(false))
	dev := attach(t, eng.File, 4096)
	ctx := context.Background()
	if err := filesystem.Make(ctx, dev, "ext4"); err != nil {
		t.Fatal(err)
	}
	mnt := mountTmp(t, dev)
	if err := syscall.Kill(eng.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitGone(t, eng.PID)
	// Writes are not acknowledged.
	f, err := os.Create(filepath.Join(mnt, "after-kill"))
	if err == nil {
		_, err = f.Write(make([]byte, 1<<20))
		if err == nil {
			err = f.Sync()
		}
		f.Close()
	}
	if err == nil {
		t.Fatal("write + fsync after the engine died succeeded")
	}
	// Reads of the device fail rather than returning zeros.
	d, err := os.OpenFile(dev, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	buf := alignedBuf(4096)
	if _, err := d.ReadAt(buf, 32<<20); err == nil {
		t.Fatal("read from the loop device after the engine died succeeded")
	}
	if err := DialControl(eng.ControlSocket).Health(ctx); err == nil {
		t.Fatal("health OK after kill")
	}
}

func TestResize(t *testing.T) {
	requireRoot(t)
	v := newTestVolume(t, 16<<20, 4096, false)
	eng := v.start(t, v.spec(false))
	dev := attach(t, eng.File, 4096)
	ctx := context.Background()
	ctl := DialControl(eng.ControlSocket)
	if err := ctl.Resize(ctx, 64<<20); err == nil {
		t.Fatal("resize beyond the image succeeded")
	}
	if err := os.Truncate(v.image, v.dataOffset+48<<20); err != nil {
		t.Fatal(err)
	}
	if err := ctl.Resize(ctx, 48<<20); err != nil {
		t.Fatal(err)
	}
	if err := loopdev.SetCapacity(ctx, dev); err != nil {
		t.Fatal(err)
	}
	d, err := os.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	n, err := d.Seek(0, io.SeekEnd)
	if err != nil || n != 48<<20 {
		t.Fatalf("loop device size %d (%v), want %d", n, err, 48<<20)
	}
	s, err := ctl.Stats(ctx)
	if err != nil || s.Size != 48<<20 {
		t.Fatalf("stats %+v, %v", s, err)
	}
	if err := ctl.Resize(ctx, 16<<20); err == nil {
		t.Fatal("shrinking succeeded")
	}
}

func TestKeyNotInProcOrLog(t *testing.T) {
	requireRoot(t)
	v := newTestVolume(t, 8<<20, 512, false)
	eng := v.start(t, v.spec(false))
	pid := fmt.Sprint(eng.PID)
	for _, name := range []string{"cmdline", "environ"} {
		b, err := os.ReadFile(filepath.Join("/proc", pid, name))
		if err != nil {
			t.Fatal(err)
		}
		for _, enc := range [][]byte{v.key, v.key[:16], []byte(hex.EncodeToString(v.key[:16])), []byte(testPassphrase)} {
			if bytes.Contains(b, enc) {
				t.Fatalf("key material in /proc/%s/%s", pid, name)
			}
		}
	}
	b, err := os.ReadFile(filepath.Join("/proc", pid, "status"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(b, []byte("VmLck:")) || bytes.Contains(b, []byte("VmLck:\t       0 kB")) {
		t.Errorf("engine has no locked memory:\n%s", b)
	}
	// oom_score_adj -1000 and PR_SET_IO_FLUSHER need CAP_SYS_RESOURCE; without
	// it (as in some sandboxes) the engine must say so in its log.
	adj, _ := os.ReadFile(filepath.Join("/proc", pid, "oom_score_adj"))
	log, _ := os.ReadFile(filepath.Join(v.runDir, LogFileName))
	if hasCapSysResource(t) {
		if strings.TrimSpace(string(adj)) != "-1000" {
			t.Errorf("oom_score_adj = %q; engine log:\n%s", adj, log)
		}
	} else if !bytes.Contains(log, []byte("Setting oom_score_adj failed")) || !bytes.Contains(log, []byte("PR_SET_IO_FLUSHER")) {
		t.Errorf("no CAP_SYS_RESOURCE, yet the engine log does not report the failed hardening:\n%s", log)
	}
	// fd 3 (the report pipe) is closed once the engine reported.
	if l, err := os.Readlink(filepath.Join("/proc", pid, "fd", "3")); err == nil && strings.HasPrefix(l, "pipe:") {
		t.Errorf("engine still holds the report pipe on fd 3")
	}
	log, _ = os.ReadFile(filepath.Join(v.runDir, LogFileName))
	if bytes.Contains(log, []byte(hex.EncodeToString(v.key[:16]))) || bytes.Contains(log, v.key[:16]) {
		t.Fatal("key in the engine log")
	}
}

func TestStartEngineCleanupOnFailure(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	v := newTestVolume(t, 8<<20, 4096, false)

	// Engine exits early: a passphrase that opens no keyslot.
	s := v.spec(false)
	s.PassphraseFile = filepath.Join(t.TempDir(), "wrong")
	os.WriteFile(s.PassphraseFile, []byte("not the passphrase"), 0o600)
	t.Setenv(engineEnv, "1")
	if _, _, err := StartEngine(ctx, os.Args[0], s); !errors.Is(err, ErrWrongPassphrase) {
		t.Fatalf("StartEngine with a wrong passphrase: %v, want ErrWrongPassphrase", err)
	}
	assertClean(t, v.runDir)

	// Not a LUKS2 image.
	s = v.spec(false)
	s.Image = filepath.Join(t.TempDir(), "raw.img")
	os.WriteFile(s.Image, make([]byte, 1<<20), 0o600)
	if _, _, err := StartEngine(ctx, os.Args[0], s); !errors.Is(err, ErrBadHeader) {
		t.Fatalf("StartEngine on a raw image: %v, want ErrBadHeader", err)
	}
	assertClean(t, v.runDir)

	// Missing image.
	s = v.spec(false)
	s.Image = filepath.Join(t.TempDir(), "missing.img")
	if _, _, err := StartEngine(ctx, os.Args[0], s); err == nil {
		t.Fatal("StartEngine on a missing image succeeded")
	}
	assertClean(t, v.runDir)

	// An engine that never serves is killed at the deadline.
	script := filepath.Join(t.TempDir(), "hang.sh")
	pidFile := script + ".pid"
	os.WriteFile(script, []byte("#!/bin/sh\necho $$ > "+pidFile+"\nexec sleep 600\n"), 0o700)
	tctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if _, _, err := StartEngine(tctx, script, v.spec(false)); err == nil {
		t.Fatal("StartEngine with a hanging engine succeeded")
	}
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	var pid int
	fmt.Sscan(string(b), &pid)
	waitGone(t, pid)
	assertClean(t, v.runDir)
}

func assertClean(t *testing.T, runDir string) {
	t.Helper()
	if ok, _ := mounts.IsMountPoint(FUSEDir(runDir)); ok {
		t.Fatalf("FUSE mount left at %s", FUSEDir(runDir))
	}
	if _, err := os.Stat(ControlSocketPath(runDir)); err == nil {
		t.Fatal("control socket left behind")
	}
}

// hasCapSysResource reports whether this process has CAP_SYS_RESOURCE.
func hasCapSysResource(t *testing.T) bool {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			var caps uint64
			fmt.Sscanf(strings.TrimSpace(v), "%x", &caps)
			return caps&(1<<unix.CAP_SYS_RESOURCE) != 0
		}
	}
	t.Fatal("no CapEff in /proc/self/status")
	return false
}

// TestTruncatedImageGivesEIO: an image cut short under the engine gives I/O
// errors (counted in the stats), never zeros.
func TestTruncatedImageGivesEIO(t *testing.T) {
	requireRoot(t)
	v := newTestVolume(t, 8<<20, 4096, true)
	eng := v.start(t, v.spec(false))
	if err := os.Truncate(v.image, v.dataOffset+4<<20); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(eng.File)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(make([]byte, 4096), 6<<20); !errors.Is(err, syscall.EIO) {
		t.Fatalf("read past the truncated image: %v, want EIO", err)
	}
	s, err := DialControl(eng.ControlSocket).Stats(context.Background())
	if err != nil || s.IOErrors == 0 {
		t.Fatalf("stats %+v, %v: want I/O errors counted", s, err)
	}
}

// TestShutdownRefusedWhileInUse: while a loop device holds the file, neither
// a Shutdown request nor SIGTERM stops the engine (that would lose the
// filesystem's data); after the detach, Shutdown ends it.
func TestShutdownRefusedWhileInUse(t *testing.T) {
	requireRoot(t)
	v := newTestVolume(t, 8<<20, 4096, false)
	eng := v.start(t, v.spec(false))
	ctx := context.Background()
	dev, err := loopAttach(ctx, eng.File, 4096, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loopdev.Detach(context.Background(), dev) })
	ctl := DialControl(eng.ControlSocket)
	if err := ctl.Shutdown(ctx); err == nil || !strings.Contains(err.Error(), "busy") {
		t.Fatalf("Shutdown while in use: %v, want a busy error", err)
	}
	if err := syscall.Kill(eng.PID, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// Wait until the engine has handled the signal (it logs the refusal),
	// then check that it still serves.
	logPath := filepath.Join(v.runDir, LogFileName)
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		b, _ := os.ReadFile(logPath)
		if bytes.Contains(b, []byte("Signal received but the FUSE mount is busy")) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the engine did not report handling SIGTERM; log:\n%s", b)
		}
	}
	if err := ctl.Health(ctx); err != nil {
		t.Fatalf("engine gone after SIGTERM while in use: %v", err)
	}
	d, err := os.OpenFile(dev, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	buf := alignedBuf(4096)
	_, err = d.WriteAt(buf, 0)
	d.Close()
	if err != nil {
		t.Fatalf("I/O after a refused shutdown: %v", err)
	}
	if err := loopdev.Detach(ctx, dev); err != nil {
		t.Fatal(err)
	}
	if err := UnmountEngine(ctx, v.runDir); err != nil {
		t.Fatal(err)
	}
	waitGone(t, eng.PID)
	if ok, _ := mounts.IsMountPoint(FUSEDir(v.runDir)); ok {
		t.Fatal("FUSE still mounted after shutdown")
	}
}

// TestOnlineGrow grows a mounted ext4 and xfs online: image, engine, loop
// device, filesystem, as NodeExpandVolume does.
func TestOnlineGrow(t *testing.T) {
	requireRoot(t, "mkfs.ext4", "resize2fs", "mkfs.xfs", "xfs_growfs")
	for _, fstype := range []string{"ext4", "xfs"} {
		t.Run(fstype, func(t *testing.T) {
			const before, after = 320 << 20, 512 << 20
			v := newTestVolume(t, before, 4096, false)
			eng := v.start(t, v.spec(false))
			dev := attach(t, eng.File, 4096)
			ctx := context.Background()
			if err := filesystem.Make(ctx, dev, fstype); err != nil {
				t.Fatal(err)
			}
			mnt := t.TempDir()
			if err := mounts.Mount(ctx, dev, mnt, fstype, nil); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { mounts.Unmount(context.Background(), mnt) })
			st0, err := filesystem.Stats(mnt)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(v.image, v.dataOffset+after); err != nil {
				t.Fatal(err)
			}
			if err := DialControl(eng.ControlSocket).Resize(ctx, 0); err != nil {
				t.Fatal(err)
			}
			if err := loopdev.SetCapacity(ctx, dev); err != nil {
				t.Fatal(err)
			}
			err = filesystem.Resize(ctx, dev, mnt, fstype)
			if fstype == "ext4" && !hasCapSysResource(t) {
				// Online ext4 resize (EXT4_IOC_RESIZE_FS) needs CAP_SYS_RESOURCE;
				// without it the error must say so.
				if err == nil || !strings.Contains(err.Error(), "CAP_SYS_RESOURCE") {
					t.Fatalf("ext4 resize without CAP_SYS_RESOURCE: %v, want an error naming the capability", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			st1, err := filesystem.Stats(mnt)
			if err != nil {
				t.Fatal(err)
			}
			if st1.TotalBytes-st0.TotalBytes < (after-before)*9/10 {
				t.Fatalf("%s grew from %d to %d bytes, want about +%d", fstype, st0.TotalBytes, st1.TotalBytes, after-before)
			}
			if err := os.WriteFile(filepath.Join(mnt, "f"), make([]byte, 1<<20), 0o600); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestFioVerify writes random blocks of mixed sizes through the loop device
// at queue depth 16 (requests served concurrently by the engine) and
// verifies every block on read back.
// TestFioVerify writes and verifies random blocks of mixed sizes through
// the engine's fast path, with both FUSE transports; an engine on rings
// refuses to hand its connection off.
func TestFioVerify(t *testing.T) {
	requireRoot(t, "fio")
	if err := fuseserve.EnableIOURing(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		ss        int
		transport string
	}{{4096, TransportClassic}, {512, TransportClassic}, {4096, TransportIOURing}} {
		ss := tc.ss
		t.Run(fmt.Sprint(ss, tc.transport), func(t *testing.T) {
			v := newTestVolume(t, 64<<20, ss, false)
			spec := v.spec(false)
			spec.FUSETransport = tc.transport
			eng := v.start(t, spec)
			dev := attach(t, eng.File, ss)
			bs := "4k-256k"
			if ss == 512 {
				bs = "512-64k"
			}
			cmd := exec.Command("fio", "--name=verify", "--filename="+dev, "--size=48M", "--rw=randwrite",
				"--bsrange="+bs, "--blockalign="+fmt.Sprint(ss), "--ioengine=libaio", "--iodepth=16", "--direct=1",
				"--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--randrepeat=0", "--verify_state_save=0")
			cmd.Dir = t.TempDir()
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("fio verify: %v\n%s", err, out)
			}
			s, err := DialControl(eng.ControlSocket).Stats(context.Background())
			if err != nil || s.WriteOps < 100 || s.ReadOps < 100 || s.IOErrors != 0 || !s.FastPath {
				t.Fatalf("stats %+v, %v", s, err)
			}
			if onRings := s.RingRequests > s.WriteOps; onRings != (tc.transport == TransportIOURing) {
				t.Fatalf("%d requests over FUSE-over-io_uring, %d writes", s.RingRequests, s.WriteOps)
			}
			if tc.transport == TransportIOURing {
				if err := DialControl(eng.ControlSocket).Handoff(context.Background()); err == nil || !strings.Contains(err.Error(), "cannot hand") {
					t.Fatalf("handoff of an engine on rings: %v", err)
				}
			}
		})
	}
}

// TestRestartAfterCrash: after kill -9 of an engine, StartEngine on the same
// run dir cleans the dead mount and serves the data again.
func TestRestartAfterCrash(t *testing.T) {
	requireRoot(t)
	v := newTestVolume(t, 8<<20, 4096, false)
	spec := v.spec(false)
	eng := v.start(t, spec)
	marker := make([]byte, 4096)
	copy(marker, "RESTART-MARKER")
	w, err := os.OpenFile(eng.File, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt(marker, 0); err != nil {
		t.Fatal(err)
	}
	w.Close()
	ctx := context.Background()
	dev, err := loopAttach(ctx, eng.File, 4096, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loopdev.Detach(context.Background(), dev) })
	syscall.Kill(eng.PID, syscall.SIGKILL)
	waitGone(t, eng.PID)
	if _, err := os.Stat(eng.File); err == nil {
		t.Fatal("dead engine's file still answers")
	}
	// While the loop device holds the dead mount, a new engine is refused
	// (a lazy detach could let two engines serve one image).
	t.Setenv(engineEnv, "1")
	if _, _, err := StartEngine(ctx, os.Args[0], spec); err == nil || !strings.Contains(err.Error(), "still in use") {
		t.Fatalf("StartEngine over a busy dead mount: %v", err)
	}
	if err := loopdev.Detach(ctx, dev); err != nil {
		t.Fatal(err)
	}
	eng2 := v.start(t, spec)
	got := make([]byte, 4096)
	f, err := os.Open(eng2.File)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(got, 0); err != nil || !bytes.Equal(got, marker) {
		t.Fatalf("data after restart: %v", err)
	}
}

// alignedBuf returns n bytes aligned for O_DIRECT.
func alignedBuf(n int) []byte {
	b := make([]byte, n+4096)
	off := 4096 - int(uintptr(unsafe.Pointer(&b[0]))%4096)
	return b[off%4096 : off%4096+n]
}

// TestOneEnginePerImage: a second engine on an image that an engine serves
// (another run dir, as a second `volume open` or a stage of the same image
// would make) fails before any KMS or keyslot work with ErrInUse naming the
// holder; the first keeps serving; the lock goes with the first engine.
func TestOneEnginePerImage(t *testing.T) {
	requireRoot(t)
	v := newTestVolume(t, 8<<20, 4096, false)
	first := v.spec(false)
	eng := v.start(t, first)
	second := first
	second.VolumeID = "second"
	second.RunDir = filepath.Join(t.TempDir(), "run2")
	t.Setenv(engineEnv, "1")
	_, _, err := StartEngine(context.Background(), os.Args[0], second)
	os.Unsetenv(engineEnv)
	if !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), first.VolumeID) {
		t.Fatalf("second engine on the image: %v, want ErrInUse naming %s", err, first.VolumeID)
	}
	if err := DialControl(eng.ControlSocket).Health(context.Background()); err != nil {
		t.Fatalf("first engine after the refused second: %v", err)
	}
	if err := imagelock.CheckPath(v.image); !errors.Is(err, imagelock.ErrInUse) {
		t.Fatalf("lock check while served: %v", err)
	}
	if err := UnmountEngine(context.Background(), v.runDir); err != nil {
		t.Fatal(err)
	}
	waitGone(t, eng.PID)
	if err := imagelock.CheckPath(v.image); err != nil {
		t.Fatalf("lock still held after the engine stopped: %v", err)
	}
}
