package crypt

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// needCryptsetup fails the test (never skips) when cryptsetup is missing:
// scripts/install-deps.sh installs it.
func needCryptsetup(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("cryptsetup"); err != nil {
		t.Fatal("cryptsetup not found: install cryptsetup-bin (scripts/install-deps.sh)")
	}
}

func cryptsetup(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("cryptsetup", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("cryptsetup %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

var mkDumpRE = regexp.MustCompile(`(?s)MK dump:\s*((?:[0-9a-f]{2}\s+)+)`)

// dumpVolumeKey returns the volume key that cryptsetup unlocks with keyFile.
func dumpVolumeKey(t *testing.T, image, keyFile string) []byte {
	t.Helper()
	out := cryptsetup(t, "luksDump", "--dump-volume-key", "--key-file", keyFile, "-q", image)
	m := mkDumpRE.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no MK dump in cryptsetup output:\n%s", out)
	}
	key, err := hex.DecodeString(strings.Join(strings.Fields(m[1]), ""))
	if err != nil {
		t.Fatalf("parse MK dump: %v", err)
	}
	return key
}

func randBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// formatTestImage formats a new image with a random key and passphrase and
// writes the passphrase to a key file.
func formatTestImage(t *testing.T, sectorSize int, tok *KMSToken) (image, keyFile string, vk, pass []byte) {
	t.Helper()
	dir := t.TempDir()
	image = filepath.Join(dir, "vol.img")
	keyFile = filepath.Join(dir, "pass")
	vk = randBytes(t, 64)
	pass = randBytes(t, 32)
	if err := os.WriteFile(keyFile, pass, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(image)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := Format(f, 8<<20, FormatOptions{SectorSize: sectorSize, VolumeKey: vk, Passphrase: pass, Token: tok}); err != nil {
		t.Fatalf("Format: %v", err)
	}
	return image, keyFile, vk, pass
}

func openHeader(t *testing.T, image string) (*Header, *os.File) {
	t.Helper()
	f, err := os.OpenFile(image, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	h, err := ReadHeader(f)
	if err != nil {
		t.Fatalf("ReadHeader: %v", err)
	}
	return h, f
}

var testToken = &KMSToken{KMSID: "default", KeyID: "region-a/v1", Ciphertext: []byte("wrapped-passphrase"), Annotations: map[string][]byte{"k": []byte("v")}}

// Our headers are accepted by cryptsetup: luksDump lists the token,
// --test-passphrase opens keyslot 0, and the volume key it dumps is ours.
func TestFormatAcceptedByCryptsetup(t *testing.T) {
	needCryptsetup(t)
	for _, ss := range []int{512, 4096} {
		image, keyFile, vk, pass := formatTestImage(t, ss, testToken)
		dump := cryptsetup(t, "luksDump", image)
		if !strings.Contains(dump, "csi-encdisk-kms") {
			t.Errorf("sector %d: luksDump does not list our token:\n%s", ss, dump)
		}
		if !strings.Contains(dump, "sector: "+strconv.Itoa(ss)) {
			t.Errorf("sector %d: luksDump shows another sector size:\n%s", ss, dump)
		}
		cryptsetup(t, "open", "--test-passphrase", "--key-file", keyFile, image)
		if got := dumpVolumeKey(t, image, keyFile); !bytes.Equal(got, vk) {
			t.Errorf("sector %d: cryptsetup dumps another volume key", ss)
		}
		h, _ := openHeader(t, image)
		got, err := h.Unlock(pass)
		if err != nil || !bytes.Equal(got, vk) {
			t.Errorf("sector %d: our Unlock: %v", ss, err)
		}
		if _, err := h.Unlock([]byte("wrong")); !errors.Is(err, ErrWrongPassphrase) {
			t.Errorf("wrong passphrase: %v, want ErrWrongPassphrase", err)
		}
		if h.DataOffset() != DefaultDataOffset || h.SectorSize() != ss || h.Cipher() != "aes-xts-plain64" || h.KeySize() != 64 {
			t.Errorf("header fields: offset %d sector %d cipher %s key %d", h.DataOffset(), h.SectorSize(), h.Cipher(), h.KeySize())
		}
		tok, ok := h.KMSToken()
		if !ok || tok.KMSID != "default" || tok.KeyID != "region-a/v1" || !bytes.Equal(tok.Ciphertext, testToken.Ciphertext) || string(tok.Annotations["k"]) != "v" {
			t.Errorf("KMS token round trip: %+v %v", tok, ok)
		}
	}
}

// Headers that cryptsetup wrote (pbkdf2 and argon2id, both sector sizes)
// unlock with our reader to the volume key cryptsetup dumps.
func TestOpenCryptsetupHeaders(t *testing.T) {
	needCryptsetup(t)
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"pbkdf2-512", []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--sector-size", "512"}},
		{"pbkdf2-sha512-4096", []string{"--pbkdf", "pbkdf2", "--hash", "sha512", "--pbkdf-force-iterations", "1000", "--sector-size", "4096"}},
		{"argon2id-512", []string{"--pbkdf", "argon2id", "--pbkdf-memory", "32", "--pbkdf-force-iterations", "4", "--sector-size", "512"}},
		{"argon2id-4096", []string{"--pbkdf", "argon2id", "--pbkdf-memory", "32", "--pbkdf-force-iterations", "4", "--sector-size", "4096"}},
		{"argon2i-4096", []string{"--pbkdf", "argon2i", "--pbkdf-memory", "32", "--pbkdf-force-iterations", "4", "--sector-size", "4096"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			image := filepath.Join(dir, "c.img")
			keyFile := filepath.Join(dir, "key")
			pass := randBytes(t, 32)
			if err := os.WriteFile(keyFile, pass, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(image, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(image, 20<<20); err != nil {
				t.Fatal(err)
			}
			args := append([]string{"luksFormat", "--type", "luks2", "-q", "--key-file", keyFile}, tc.args...)
			cryptsetup(t, append(args, image)...)
			want := dumpVolumeKey(t, image, keyFile)
			h, _ := openHeader(t, image)
			got, err := h.Unlock(pass)
			if err != nil {
				t.Fatalf("Unlock: %v", err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("our volume key differs from cryptsetup's")
			}
			if _, err := h.Unlock(append([]byte{1}, pass...)); !errors.Is(err, ErrWrongPassphrase) {
				t.Fatalf("wrong passphrase: %v", err)
			}
		})
	}
}

// cryptsetup reencrypt --encrypt turns a file of known plaintext into a
// LUKS2 image with real dm-crypt ciphertext; our engine must produce the same
// ciphertext and decrypt it back. This pins the plain64 IV convention with
// 4096-byte sectors (tweaks 0, 8, 16, ...).
func TestDataMatchesCryptsetupReencrypt(t *testing.T) {
	needCryptsetup(t)
	for _, ss := range []int{512, 4096} {
		t.Run(strconv.Itoa(ss), func(t *testing.T) {
			dir := t.TempDir()
			image := filepath.Join(dir, "plain.img")
			keyFile := filepath.Join(dir, "key")
			if err := os.WriteFile(keyFile, randBytes(t, 32), 0o600); err != nil {
				t.Fatal(err)
			}
			const total = 40 << 20
			const reduce = 32 << 20
			plain := randBytes(t, total-reduce)
			full := make([]byte, total)
			copy(full, plain)
			if err := os.WriteFile(image, full, 0o600); err != nil {
				t.Fatal(err)
			}
			cryptsetup(t, "reencrypt", "--encrypt", "--type", "luks2", "-q", "--key-file", keyFile,
				"--reduce-device-size", "32M", "--sector-size", strconv.Itoa(ss), "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", image)
			vk := dumpVolumeKey(t, image, keyFile)
			h, f := openHeader(t, image)
			if h.SectorSize() != ss {
				t.Fatalf("sector size %d, want %d", h.SectorSize(), ss)
			}
			cipherText := make([]byte, len(plain))
			if _, err := f.ReadAt(cipherText, h.DataOffset()); err != nil {
				t.Fatal(err)
			}
			x, err := NewXTS(vk, ss)
			if err != nil {
				t.Fatal(err)
			}
			mine := make([]byte, len(plain))
			x.EncryptSectors(mine, plain, 0)
			if !bytes.Equal(mine, cipherText) {
				t.Fatal("our ciphertext differs from cryptsetup's")
			}
			back := make([]byte, len(plain))
			x.DecryptSectors(back, cipherText, 0)
			if !bytes.Equal(back, plain) {
				t.Fatal("decrypting cryptsetup's ciphertext does not give the plaintext")
			}
			// A buffer in the middle: tweak = offset in 512-byte units.
			off := 5 * ss
			mid := make([]byte, 2*ss)
			x.DecryptSectors(mid, cipherText[off:off+2*ss], uint64(off/512))
			if !bytes.Equal(mid, plain[off:off+2*ss]) {
				t.Fatal("decrypting from a middle sector gives wrong plaintext")
			}
		})
	}
}

// One damaged copy: the other is used. Both damaged: an error, not a panic.
func TestDamagedCopies(t *testing.T) {
	image, _, vk, pass := formatTestImage(t, 4096, nil)
	for _, c := range []struct {
		name    string
		offsets []int64
		damaged string
		fail    bool
	}{
		{"primary-binary", []int64{100}, "primary", false},
		{"primary-json", []int64{5000}, "primary", false},
		{"secondary-json", []int64{16384 + 5000}, "secondary", false},
		{"both", []int64{5000, 16384 + 5000}, "", true},
	} {
		t.Run(c.name, func(t *testing.T) {
			data, err := os.ReadFile(image)
			if err != nil {
				t.Fatal(err)
			}
			for _, o := range c.offsets {
				data[o] ^= 0x55
			}
			h, err := ReadHeader(bytes.NewReader(data))
			if c.fail {
				if err == nil || errors.Is(err, ErrNotLUKS2) {
					t.Fatalf("both copies damaged: err %v", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("ReadHeader: %v", err)
			}
			if h.Damaged() != c.damaged {
				t.Errorf("Damaged() = %q, want %q", h.Damaged(), c.damaged)
			}
			got, err := h.Unlock(pass)
			if err != nil || !bytes.Equal(got, vk) {
				t.Errorf("Unlock after damage: %v", err)
			}
		})
	}
	if _, err := ReadHeader(bytes.NewReader(make([]byte, 64<<10))); !errors.Is(err, ErrNotLUKS2) {
		t.Errorf("zeros: %v, want ErrNotLUKS2", err)
	}
}

// SetKMSToken replaces the token in both copies with the seqid bumped, and
// cryptsetup sees the new one.
func TestSetKMSToken(t *testing.T) {
	needCryptsetup(t)
	image, keyFile, vk, pass := formatTestImage(t, 4096, testToken)
	h0, f := openHeader(t, image)
	newTok := &KMSToken{KMSID: "default", KeyID: "region-a/v2", Ciphertext: []byte("rewrapped"), Annotations: nil}
	if err := SetKMSToken(f, newTok); err != nil {
		t.Fatalf("SetKMSToken: %v", err)
	}
	h, err := ReadHeader(f)
	if err != nil {
		t.Fatal(err)
	}
	if h.SeqID() != h0.SeqID()+1 || h.Damaged() != "" {
		t.Errorf("seqid %d -> %d, damaged %q", h0.SeqID(), h.SeqID(), h.Damaged())
	}
	tok, ok := h.KMSToken()
	if !ok || tok.KeyID != "region-a/v2" || string(tok.Ciphertext) != "rewrapped" {
		t.Fatalf("token after update: %+v", tok)
	}
	if len(h.Tokens()) != 1 {
		t.Errorf("%d tokens, want the old one replaced", len(h.Tokens()))
	}
	if got, err := h.Unlock(pass); err != nil || !bytes.Equal(got, vk) {
		t.Errorf("unlock after token update: %v", err)
	}
	if !strings.Contains(cryptsetup(t, "luksDump", image), "csi-encdisk-kms") {
		t.Error("cryptsetup does not see the token after update")
	}
	cryptsetup(t, "open", "--test-passphrase", "--key-file", keyFile, image)
	// The secondary copy alone holds the update too.
	data, _ := os.ReadFile(image)
	data[100] ^= 1
	hs, err := ReadHeader(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	if tok, _ := hs.KMSToken(); tok == nil || tok.KeyID != "region-a/v2" {
		t.Error("secondary copy does not hold the updated token")
	}
}

// Wipe leaves no 16-byte block of the old header and keyslot area in place,
// and the image is no longer LUKS2.
func TestWipe(t *testing.T) {
	image, _, _, _ := formatTestImage(t, 4096, testToken)
	before, err := os.ReadFile(image)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(image, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := Wipe(f); err != nil {
		t.Fatalf("Wipe: %v", err)
	}
	after, err := os.ReadFile(image)
	if err != nil {
		t.Fatal(err)
	}
	var zero [16]byte
	nonZero, surviving := 0, 0
	for off := 0; off < DefaultDataOffset; off += 16 {
		b := before[off : off+16]
		if bytes.Equal(b, zero[:]) {
			continue
		}
		nonZero++
		if bytes.Equal(b, after[off:off+16]) {
			surviving++
		}
	}
	if nonZero < 1000 || surviving != 0 {
		t.Errorf("%d of %d non-zero header/keyslot blocks survived", surviving, nonZero)
	}
	if _, err := ReadHeader(f); !errors.Is(err, ErrNotLUKS2) {
		t.Errorf("after wipe: %v, want ErrNotLUKS2", err)
	}
	if len(after) != len(before) {
		t.Errorf("wipe changed the image size")
	}
}

func TestFormatRejectsBadInput(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "x.img"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	good := FormatOptions{SectorSize: 4096, VolumeKey: randBytes(t, 64), Passphrase: []byte("p")}
	for name, mod := range map[string]func(o *FormatOptions) int64{
		"sector":  func(o *FormatOptions) int64 { o.SectorSize = 1024; return 1 << 20 },
		"key":     func(o *FormatOptions) int64 { o.VolumeKey = o.VolumeKey[:48]; return 1 << 20 },
		"halves":  func(o *FormatOptions) int64 { o.VolumeKey = make([]byte, 64); return 1 << 20 },
		"pass":    func(o *FormatOptions) int64 { o.Passphrase = nil; return 1 << 20 },
		"size":    func(o *FormatOptions) int64 { return 1000 },
		"zero":    func(o *FormatOptions) int64 { return 0 },
		"label":   func(o *FormatOptions) int64 { o.Label = strings.Repeat("x", 60); return 1 << 20 },
		"nilciph": func(o *FormatOptions) int64 { o.Token = &KMSToken{}; return 1 << 20 },
	} {
		o := good
		size := mod(&o)
		if _, err := Format(f, size, o); err == nil {
			t.Errorf("%s: Format accepted bad input", name)
		}
	}
}

// rewriteJSON returns the image bytes with both header copies carrying the
// metadata that edit makes of the original (checksums redone).
func rewriteJSON(t *testing.T, image []byte, edit func(m map[string]any)) []byte {
	t.Helper()
	h, err := ReadHeader(bytes.NewReader(image))
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	raw, _ := json.Marshal(h.raw)
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatal(err)
	}
	edit(m)
	text, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	out := append([]byte(nil), image...)
	hf := headerFields{hdrSize: h.hdrSize, seqID: h.seqID + 1, uuid: h.uuid, csumAlg: h.csumAlg}
	for _, primary := range []bool{true, false} {
		c, err := encodeCopy(hf, text, primary, make([]byte, lenSalt))
		if err != nil {
			t.Fatal(err)
		}
		off := 0
		if !primary {
			off = int(h.hdrSize)
		}
		copy(out[off:], c)
	}
	return out
}

// Headers that parse but ask for what would crash, hang or be served wrong
// (absurd KDF costs, a reencryption in progress, integrity, an IV offset)
// are refused by ReadHeader.
func TestReadHeaderRefusesUnsafeMetadata(t *testing.T) {
	image, _, _, _ := formatTestImage(t, 4096, nil)
	data, err := os.ReadFile(image)
	if err != nil {
		t.Fatal(err)
	}
	data = data[:64<<10]
	get := func(m map[string]any, path ...string) map[string]any {
		for _, p := range path {
			m = m[p].(map[string]any)
		}
		return m
	}
	if _, err := ReadHeader(bytes.NewReader(rewriteJSON(t, data, func(map[string]any) {}))); err != nil {
		t.Fatalf("unchanged metadata refused: %v", err)
	}
	for name, edit := range map[string]func(m map[string]any){
		"argon2 time beyond uint32": func(m map[string]any) {
			get(m, "keyslots", "0")["kdf"] = map[string]any{"type": "argon2id", "time": 4294967296, "memory": 1024, "cpus": 1, "salt": "AAAA"}
		},
		"pbkdf2 iterations huge": func(m map[string]any) { get(m, "keyslots", "0", "kdf")["iterations"] = 1e12 },
		"digest iterations huge": func(m map[string]any) { get(m, "digests", "0")["iterations"] = 1e12 },
		"second segment":         func(m map[string]any) { get(m, "segments")["1"] = get(m, "segments", "0") },
		"iv tweak":               func(m map[string]any) { get(m, "segments", "0")["iv_tweak"] = "8" },
		"integrity":              func(m map[string]any) { get(m, "segments", "0")["integrity"] = map[string]any{"type": "hmac(sha256)"} },
		"mandatory requirement": func(m map[string]any) {
			get(m, "config")["requirements"] = map[string]any{"mandatory": []any{"online-reencrypt-v2"}}
		},
		"sector size 2048":          func(m map[string]any) { get(m, "segments", "0")["sector_size"] = 2048 },
		"null keyslot":              func(m map[string]any) { get(m, "keyslots")["1"] = nil },
		"null digest":               func(m map[string]any) { get(m, "digests")["1"] = nil },
		"null token":                func(m map[string]any) { m["tokens"] = map[string]any{"0": nil} },
		"digest names no keyslot":   func(m map[string]any) { get(m, "digests", "0")["keyslots"] = []any{"7"} },
		"keyslot area past the end": func(m map[string]any) { get(m, "keyslots", "0", "area")["offset"] = "999999999999" },
	} {
		if _, err := ReadHeader(bytes.NewReader(rewriteJSON(t, data, edit))); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
