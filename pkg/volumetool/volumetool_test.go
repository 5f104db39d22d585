package volumetool

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
)

func TestFormatInspect(t *testing.T) {
	if _, err := exec.LookPath("cryptsetup"); err != nil {
		t.Fatal("cryptsetup not found: install cryptsetup-bin (scripts/install-deps.sh)")
	}
	dir := t.TempDir()
	key := filepath.Join(dir, "key")
	pass := []byte("correct horse battery staple")
	if err := os.WriteFile(key, pass, 0o600); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "v.img")
	cost := &crypt.Argon2Params{Time: 4, MemoryKiB: 32 << 10, Threads: 1}
	if err := Format(img, 8<<20, key, FormatOptions{SectorSize: 512, Argon2: cost}); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("cryptsetup", "open", "--test-passphrase", "--key-file", key, img).CombinedOutput(); err != nil {
		t.Fatalf("cryptsetup rejects the passphrase: %v %s", err, out)
	}
	st, _ := os.Stat(img)
	if st.Size() != 16<<20+8<<20 {
		t.Errorf("image size %d", st.Size())
	}
	if err := Format(img, 8<<20, key, FormatOptions{SectorSize: 512, Argon2: cost}); err == nil || !strings.Contains(err.Error(), "exists") {
		t.Errorf("second format: %v", err)
	}
	if err := Format(filepath.Join(dir, "bad.img"), 1000, key, FormatOptions{SectorSize: 4096, Argon2: cost}); err == nil {
		t.Error("unaligned size accepted")
	}
	if _, err := os.Stat(filepath.Join(dir, "bad.img")); !os.IsNotExist(err) {
		t.Error("a refused format left a file behind")
	}
	var text, js bytes.Buffer
	if err := Inspect(img, false, &text); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(text.String(), "aes-xts-plain64") || !strings.Contains(text.String(), "sector 512") || !strings.Contains(text.String(), "argon2id, time 4") {
		t.Errorf("inspect text:\n%s", text.String())
	}
	if err := Inspect(img, true, &js); err != nil {
		t.Fatal(err)
	}
	var d map[string]any
	if err := json.Unmarshal(js.Bytes(), &d); err != nil {
		t.Fatalf("inspect --json is not JSON: %v", err)
	}
	if bytes.Contains(js.Bytes(), pass) || bytes.Contains(text.Bytes(), pass) {
		t.Error("inspect shows the passphrase")
	}
	if err := Inspect(key, false, &text); err == nil || !strings.Contains(err.Error(), "not a LUKS2 image") {
		t.Errorf("inspect of a non-LUKS file: %v", err)
	}
}

// TestFormatKeyIsRandom: --key-is-random gives the driver's fast pbkdf2
// keyslot, and refuses a key file too short to be 256 random bits.
func TestFormatKeyIsRandom(t *testing.T) {
	dir := t.TempDir()
	short, long := filepath.Join(dir, "short"), filepath.Join(dir, "long")
	if err := os.WriteFile(short, []byte("hunter2"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(long, bytes.Repeat([]byte{0xa5}, 32), 0o600); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "r.img")
	if err := Format(img, 8<<20, short, FormatOptions{SectorSize: 4096, KeyIsRandom: true}); err == nil || !strings.Contains(err.Error(), "at least 32") {
		t.Fatalf("a 7-byte random key: %v", err)
	}
	if _, err := os.Stat(img); !os.IsNotExist(err) {
		t.Fatal("a refused format left a file")
	}
	if err := Format(img, 8<<20, long, FormatOptions{SectorSize: 4096, KeyIsRandom: true}); err != nil {
		t.Fatal(err)
	}
	var text bytes.Buffer
	if err := Inspect(img, false, &text); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(text.String(), "pbkdf2-sha256, 1000 iterations") {
		t.Fatalf("inspect:\n%s", text.String())
	}
}
