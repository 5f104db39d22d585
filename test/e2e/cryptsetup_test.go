package e2e

import (
	"bytes"
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestOpenCryptsetupImage encrypts a file holding a known ext4 filesystem
// offline with `cryptsetup reencrypt --encrypt` (real dm-crypt ciphertext,
// made without device-mapper) and opens it with `csi-encdisk volume open
// --key-file`: the known file reads back through the Go engine.
func TestOpenCryptsetupImage(t *testing.T) {
	dir := workDir(t)
	img := filepath.Join(dir, "offline.img")
	known := make([]byte, 3*mib+123)
	if _, err := rand.Read(known); err != nil {
		t.Fatal(err)
	}
	src := filepath.Join(dir, "known.bin")
	if err := os.WriteFile(src, known, 0o600); err != nil {
		t.Fatal(err)
	}
	// 64 MiB of filesystem plus 32 MiB that reencrypt moves the data by.
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 96*mib); err != nil {
		t.Fatal(err)
	}
	run(t, "mkfs.ext4", "-q", "-F", "-b", "4096", img, "64M")
	run(t, "debugfs", "-w", "-R", "write "+src+" known.bin", img)

	pass := make([]byte, 32)
	if _, err := rand.Read(pass); err != nil {
		t.Fatal(err)
	}
	keyFile := filepath.Join(dir, "passphrase")
	if err := os.WriteFile(keyFile, pass, 0o600); err != nil {
		t.Fatal(err)
	}
	run(t, "cryptsetup", "reencrypt", "--encrypt", "--type", "luks2", "--batch-mode",
		"--cipher", "aes-xts-plain64", "--key-size", "512", "--sector-size", "4096",
		"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
		"--reduce-device-size", "32M", "--key-file", keyFile, img)
	// The ciphertext no longer shows the known content.
	if fileContains(t, img, known[:4096]) {
		t.Fatal("cryptsetup reencrypt left the known content in plaintext")
	}

	mnt := filepath.Join(dir, "mnt")
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	open := exec.Command(binary, "volume", "open", "--key-file", keyFile, "--mount", mnt, img)
	out, err := open.CombinedOutput()
	if err != nil {
		t.Fatalf("csi-encdisk volume open: %v\n%s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command(binary, "volume", "close", img).Run() })
	if !strings.Contains(string(out), "/dev/loop") {
		t.Fatalf("volume open did not print the loop device: %s", out)
	}
	got, err := os.ReadFile(filepath.Join(mnt, "known.bin"))
	if err != nil {
		t.Fatalf("read known file through the engine: %v", err)
	}
	if !bytes.Equal(got, known) {
		t.Fatal("known file read through csi-encdisk differs from what cryptsetup encrypted")
	}
	if out, err := exec.Command(binary, "volume", "close", img).CombinedOutput(); err != nil {
		t.Fatalf("csi-encdisk volume close: %v\n%s", err, out)
	}
	if m := mountsUnder(dir); len(m) != 0 {
		t.Fatalf("mounts left after volume close: %v", m)
	}
	if l := loopsUnder(dir); len(l) != 0 {
		t.Fatalf("loop devices left after volume close: %v", l)
	}
	// Still a valid cryptsetup image with the same filesystem.
	run(t, "cryptsetup", "open", "--test-passphrase", "--key-file", keyFile, img)
}
