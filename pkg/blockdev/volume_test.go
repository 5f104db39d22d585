package blockdev

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
)

// TestOpenCloseCryptsetupImage opens an image that cryptsetup formatted,
// writes through the loop device, closes, reopens and reads back.
func TestOpenCloseCryptsetupImage(t *testing.T) {
	requireRoot(t, "cryptsetup")
	dir := t.TempDir()
	image := filepath.Join(dir, "cs.img")
	pass := make([]byte, 32)
	rand.Read(pass)
	keyFile := filepath.Join(dir, "key")
	if err := os.WriteFile(keyFile, pass, 0o600); err != nil {
		t.Fatal(err)
	}
	if f, err := os.Create(image); err != nil {
		t.Fatal(err)
	} else if err := f.Truncate(48 << 20); err != nil {
		t.Fatal(err)
	} else {
		f.Close()
	}
	if out, err := exec.Command("cryptsetup", "luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2",
		"--pbkdf-force-iterations", "1000", "--sector-size", "512", "--key-file", keyFile, image).CombinedOutput(); err != nil {
		t.Fatalf("cryptsetup luksFormat: %v\n%s", err, out)
	}
	bin, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv(engineEnv, "1")
	ctx := context.Background()
	runRoot := filepath.Join(dir, "run")
	o := OpenOptions{Image: image, Passphrase: pass, RunRoot: runRoot, EngineBinary: bin}
	t.Cleanup(func() { CloseVolume(context.Background(), image, runRoot) })

	if _, err := OpenVolume(ctx, OpenOptions{Image: image, Passphrase: []byte("wrong"), RunRoot: runRoot, EngineBinary: bin}); !errors.Is(err, crypt.ErrWrongPassphrase) {
		t.Fatalf("open with a wrong passphrase: %v", err)
	}
	// --mount on a volume without a filesystem fails and leaves nothing behind.
	withMount := o
	withMount.MountDir = t.TempDir()
	if _, err := OpenVolume(ctx, withMount); err == nil || !strings.Contains(err.Error(), "no filesystem") {
		t.Fatalf("open --mount without a filesystem: %v", err)
	}
	if entries, _ := os.ReadDir(runRoot); len(entries) != 0 {
		t.Fatalf("failed open left %v in %s", entries, runRoot)
	}
	st, err := OpenVolume(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := OpenVolume(ctx, o); err == nil {
		t.Fatal("second open succeeded")
	}
	pool := newBufPool()
	marker, got := (*pool.get())[:4096], (*pool.get())[:4096]
	copy(marker, bytes.Repeat([]byte("OPEN-MARKER "), 400))
	rw := func(dev string, write bool) {
		f, err := os.OpenFile(dev, os.O_RDWR|unix.O_DIRECT, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if write {
			_, err = f.WriteAt(marker, 1<<20)
		} else {
			_, err = f.ReadAt(got, 1<<20)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	rw(st.Loop, true)
	if err := CloseVolume(ctx, image, runRoot); err != nil {
		t.Fatal(err)
	}
	if err := CloseVolume(ctx, image, runRoot); err == nil {
		t.Fatal("closing a closed volume succeeded")
	}
	if dev, _ := LoopFindByFile(ctx, PlainFile(st.RunDir)); dev != "" {
		t.Fatalf("loop %s left attached", dev)
	}
	img, _ := os.ReadFile(image)
	if bytes.Contains(img, []byte("OPEN-MARKER")) {
		t.Fatal("plaintext in the image")
	}
	st, err = OpenVolume(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	rw(st.Loop, false)
	if !bytes.Equal(got, marker) {
		t.Fatal("data did not survive close and reopen")
	}
	if err := CloseVolume(ctx, image, runRoot); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(st.RunDir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("run dir left: %v", err)
	}
}
