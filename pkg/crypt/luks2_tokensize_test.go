package crypt

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// MaxKMSToken is the largest answer the KMS v2 API allows a plugin: a
// 1 KiB ciphertext, a 1 KiB key_id of bytes that all need a JSON escape,
// and 32 KiB of annotations as short domain-name keys (the costliest
// shape in JSON) plus one large value.
func maxKMSToken(t *testing.T) *KMSToken {
	ann := map[string][]byte{"big.example.com": bytes.Repeat([]byte{0xff}, 8<<10)}
	budget := MaxKMSAnnotations - len("big.example.com") - 8<<10
	for i := 0; ; i++ {
		k := fmt.Sprintf("%d.a", i)
		if budget < len(k) {
			break
		}
		ann[k] = nil
		budget -= len(k)
	}
	return &KMSToken{
		KMSID:       "default",
		KeyID:       strings.Repeat("<", MaxKMSKeyID),
		Ciphertext:  randBytes(t, MaxKMSCiphertext),
		Annotations: ann,
	}
}

// TestMaxKMSTokenFits: a KMSHeaderSize header holds the largest KMS v2
// answer, at Format and at SetKMSToken; cryptsetup luksDump accepts it and
// the passphrase opens it; a 16 KiB header refuses it naming its JSON area.
func TestMaxKMSTokenFits(t *testing.T) {
	needCryptsetup(t)
	tok := maxKMSToken(t)
	dir := t.TempDir()
	image := filepath.Join(dir, "vol.img")
	keyFile := filepath.Join(dir, "pass")
	vk, pass := randBytes(t, 64), randBytes(t, 32)
	if err := os.WriteFile(keyFile, pass, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(image)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := Format(f, 8<<20, FormatOptions{SectorSize: 4096, VolumeKey: vk, Passphrase: pass, HeaderSize: 16 << 10, Token: tok}); err == nil ||
		!strings.Contains(err.Error(), "12288-byte JSON area") {
		t.Fatalf("16 KiB header with the largest token: %v, want an error naming the 12288-byte JSON area", err)
	}
	h, err := Format(f, 8<<20, FormatOptions{SectorSize: 4096, VolumeKey: vk, Passphrase: pass, HeaderSize: KMSHeaderSize, Token: tok})
	if err != nil {
		t.Fatalf("Format with the largest token: %v", err)
	}
	got, ok := h.KMSToken()
	if !ok || got.KeyID != tok.KeyID || !bytes.Equal(got.Ciphertext, tok.Ciphertext) || !reflect.DeepEqual(len(got.Annotations), len(tok.Annotations)) {
		t.Fatal("token does not read back")
	}
	if h.HeaderSize() != KMSHeaderSize || h.DataOffset() != DefaultDataOffset {
		t.Fatalf("header size %d, data offset %d", h.HeaderSize(), h.DataOffset())
	}
	dump := cryptsetup(t, "luksDump", image)
	if !strings.Contains(dump, "csi-encdisk-kms") || !strings.Contains(dump, "131072") {
		t.Fatalf("luksDump does not show the token and the 128 KiB metadata:\n%.2000s", dump)
	}
	cryptsetup(t, "open", "--test-passphrase", "--key-file", keyFile, image)
	// A re-wrap into the largest token again (another ciphertext).
	tok2 := maxKMSToken(t)
	if err := SetKMSToken(f, tok2); err != nil {
		t.Fatalf("SetKMSToken with the largest token: %v", err)
	}
	cryptsetup(t, "luksDump", image)
	cryptsetup(t, "open", "--test-passphrase", "--key-file", keyFile, image)
	h, err = ReadHeader(f)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := h.KMSToken(); got == nil || !bytes.Equal(got.Ciphertext, tok2.Ciphertext) {
		t.Fatal("re-wrapped token does not read back")
	}
	if vk2, err := h.Unlock(pass); err != nil || !bytes.Equal(vk2, vk) {
		t.Fatalf("unlock: %v", err)
	}
	// Wipe covers the larger header copies too.
	if err := Wipe(f); err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(image)
	if bytes.Contains(data[:DefaultDataOffset], tok2.Ciphertext[:64]) {
		t.Fatal("the token survived Wipe")
	}
}
