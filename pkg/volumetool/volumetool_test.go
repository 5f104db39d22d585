package volumetool

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseSize(t *testing.T) {
	good := map[string]int64{"4096": 4096, "10M": 10 << 20, "1Gi": 1 << 30, "2KB": 2000, "3GiB": 3 << 30}
	for in, want := range good {
		if got, err := ParseSize(in); err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "0", "-1", "10Q", "M", "1.5G", "99999999999T"} {
		if _, err := ParseSize(in); err == nil {
			t.Errorf("ParseSize(%q) accepted", in)
		}
	}
}

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
	if err := Format(img, 8<<20, key, 512); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("cryptsetup", "open", "--test-passphrase", "--key-file", key, img).CombinedOutput(); err != nil {
		t.Fatalf("cryptsetup rejects the passphrase: %v %s", err, out)
	}
	st, _ := os.Stat(img)
	if st.Size() != 16<<20+8<<20 {
		t.Errorf("image size %d", st.Size())
	}
	if err := Format(img, 8<<20, key, 512); err == nil || !strings.Contains(err.Error(), "exists") {
		t.Errorf("second format: %v", err)
	}
	if err := Format(filepath.Join(dir, "bad.img"), 1000, key, 4096); err == nil {
		t.Error("unaligned size accepted")
	}
	if _, err := os.Stat(filepath.Join(dir, "bad.img")); !os.IsNotExist(err) {
		t.Error("a refused format left a file behind")
	}
	var text, js bytes.Buffer
	if err := Inspect(img, false, &text); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(text.String(), "aes-xts-plain64") || !strings.Contains(text.String(), "sector 512") {
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
