package crypt

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestArgon2idKeyslotOpensInCryptsetup: a keyslot made with Argon2 is an
// argon2id keyslot of that cost that cryptsetup opens (and dumps our
// volume key from) and our reader opens; a wrong passphrase opens nothing.
func TestArgon2idKeyslotOpensInCryptsetup(t *testing.T) {
	needCryptsetup(t)
	dir := t.TempDir()
	image, keyFile := filepath.Join(dir, "vol.img"), filepath.Join(dir, "pass")
	pass := []byte("hunter2")
	if err := os.WriteFile(keyFile, pass, 0o600); err != nil {
		t.Fatal(err)
	}
	vk := randBytes(t, 64)
	f, err := os.Create(image)
	if err != nil {
		t.Fatal(err)
	}
	cost := Argon2Params{Time: 4, MemoryKiB: 32 << 10, Threads: 2}
	if _, err := Format(f, 8<<20, FormatOptions{SectorSize: 4096, VolumeKey: vk, Passphrase: pass, Argon2: &cost}); err != nil {
		t.Fatal(err)
	}
	f.Close()
	dump := cryptsetup(t, "luksDump", image)
	for _, want := range []string{"PBKDF:      argon2id", "Time cost:  4", "Memory:     32768", "Threads:    2"} {
		if !strings.Contains(dump, want) {
			t.Fatalf("luksDump lacks %q:\n%s", want, dump)
		}
	}
	cryptsetup(t, "open", "--test-passphrase", "--key-file", keyFile, image)
	if got := dumpVolumeKey(t, image, keyFile); !bytes.Equal(got, vk) {
		t.Fatal("cryptsetup dumps another volume key")
	}
	h, _ := openHeader(t, image)
	if got, err := h.Unlock(pass); err != nil || !bytes.Equal(got, vk) {
		t.Fatalf("our Unlock: %v", err)
	}
	if _, err := h.Unlock([]byte("hunter3")); err == nil {
		t.Fatal("wrong passphrase opened the keyslot")
	}
	bad := Argon2Params{Time: 1, MemoryKiB: 32 << 10, Threads: 1}
	f2, _ := os.Create(filepath.Join(dir, "bad.img"))
	defer f2.Close()
	if _, err := Format(f2, 8<<20, FormatOptions{SectorSize: 4096, VolumeKey: vk, Passphrase: pass, Argon2: &bad}); err == nil {
		t.Fatal("an argon2id time cost below cryptsetup's minimum was accepted")
	}
}

// TestMeasureArgon2id: the measured cost respects cryptsetup's bounds and
// lands near the target.
func TestMeasureArgon2id(t *testing.T) {
	p, err := MeasureArgon2id(200*time.Millisecond, 64<<10)
	if err != nil {
		t.Fatal(err)
	}
	if p.Time < 4 || p.MemoryKiB < 32<<10 || p.MemoryKiB > 64<<10 || p.Threads < 1 || p.Threads > 4 {
		t.Fatalf("cost %+v out of bounds", p)
	}
	t.Logf("200 ms at <= 64 MiB: %+v", p)
}
