//go:build amd64

package crypt

import (
	"bytes"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// TestXTSAsmMatchesGenerator fails when xts_amd64.s was edited by hand or
// xts_amd64_gen.go changed without `go generate`.
func TestXTSAsmMatchesGenerator(t *testing.T) {
	out := filepath.Join(t.TempDir(), "xts_amd64.s")
	cmd := exec.Command("go", "run", "xts_amd64_gen.go", "-o", out)
	if msg, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go run xts_amd64_gen.go: %v\n%s", err, msg)
	}
	want, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile("xts_amd64.s")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("xts_amd64.s differs from the output of xts_amd64_gen.go; run go generate ./pkg/crypt")
	}
}

// TestXTSKeyExpansion checks the AES key expansion (SubWord on the AES
// unit) against FIPS 197 Appendix A.1 and A.3: the last round key of the
// example keys, and the layout of the decryption schedule.
func TestXTSKeyExpansion(t *testing.T) {
	for _, c := range []struct{ key, lastRoundKey string }{
		{"2b7e151628aed2a6abf7158809cf4f3c", "d014f9a8c9ee2589e13f0cc8b6630ca6"},
		{"603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4", "fe4890d1e6188d0b046df344706c631e"},
	} {
		key, _ := hex.DecodeString(c.key)
		other := bytes.Repeat([]byte{0x5a}, len(key))
		var ks keySchedule
		ks.init(key, other)
		if want := len(key)/4 + 6; ks.nr != want {
			t.Fatalf("%d-byte key: %d rounds, want %d", len(key), ks.nr, want)
		}
		last := ks.enc[ks.nr*16 : ks.nr*16+16]
		if got := hex.EncodeToString(last); got != c.lastRoundKey {
			t.Errorf("%d-byte key: last round key %s, want %s", len(key), got, c.lastRoundKey)
		}
		if !bytes.Equal(ks.enc[:len(key)], key) || !bytes.Equal(ks.twk[:len(key)], other) {
			t.Errorf("%d-byte key: schedules do not start with their keys", len(key))
		}
		if !bytes.Equal(ks.dec[:16], last) || !bytes.Equal(ks.dec[ks.nr*16:ks.nr*16+16], ks.enc[:16]) {
			t.Errorf("%d-byte key: decryption schedule ends are wrong", len(key))
		}
	}
}
