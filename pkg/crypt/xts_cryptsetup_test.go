package crypt

import (
	"bytes"
	"encoding/hex"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

var xtsMKDumpRE = regexp.MustCompile(`(?s)MK dump:\s*((?:[0-9a-f]{2}\s+)+)`)

func xtsCryptsetup(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("cryptsetup", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("cryptsetup %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestXTSMatchesDmCrypt has cryptsetup encrypt known plaintext in place, as
// dm-crypt would (reencrypt --encrypt, offline, detached header so the data
// stays at offset 0), and checks every implementation against that
// ciphertext in both directions, with AES-128-XTS and AES-256-XTS keys and
// 512- and 4096-byte sectors. It pins the plain64 convention: the 4096-byte
// sector at byte 4096 has tweak 8.
func TestXTSMatchesDmCrypt(t *testing.T) {
	if _, err := exec.LookPath("cryptsetup"); err != nil {
		t.Fatal("cryptsetup not found: install cryptsetup-bin (scripts/install-deps.sh)")
	}
	r := rand.New(rand.NewPCG(12, 12))
	for _, c := range []struct{ keyBits, sectorSize int }{{512, 4096}, {512, 512}, {256, 4096}} {
		name := "key" + strconv.Itoa(c.keyBits) + "/sector" + strconv.Itoa(c.sectorSize)
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			image := filepath.Join(dir, "data.img")
			header := filepath.Join(dir, "header.img")
			keyFile := filepath.Join(dir, "pass")
			if err := os.WriteFile(keyFile, xtsRandBytes(r, 32), 0o600); err != nil {
				t.Fatal(err)
			}
			plain := xtsRandBytes(r, 1<<20)
			if err := os.WriteFile(image, plain, 0o600); err != nil {
				t.Fatal(err)
			}
			xtsCryptsetup(t, "reencrypt", "--encrypt", "--type", "luks2", "-q", "--header", header,
				"--key-file", keyFile, "--cipher", "aes-xts-plain64", "--key-size", strconv.Itoa(c.keyBits),
				"--sector-size", strconv.Itoa(c.sectorSize), "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", image)
			out := xtsCryptsetup(t, "luksDump", "--dump-volume-key", "--key-file", keyFile, "-q", header)
			m := xtsMKDumpRE.FindStringSubmatch(out)
			if m == nil {
				t.Fatalf("no MK dump in cryptsetup output:\n%s", out)
			}
			key, err := hex.DecodeString(strings.Join(strings.Fields(m[1]), ""))
			if err != nil || len(key) != c.keyBits/8 {
				t.Fatalf("volume key from cryptsetup: %d bytes, %v", len(key), err)
			}
			cipherText, err := os.ReadFile(image)
			if err != nil {
				t.Fatal(err)
			}
			if len(cipherText) != len(plain) || bytes.Equal(cipherText[:4096], plain[:4096]) {
				t.Fatal("cryptsetup did not encrypt the image in place")
			}
			for _, impl := range supportedImpls() {
				x := xtsMust(t, key, c.sectorSize, impl)
				got := make([]byte, len(plain))
				x.EncryptSectors(got, plain, 0)
				if !bytes.Equal(got, cipherText) {
					t.Errorf("%v: ciphertext differs from dm-crypt's", impl)
				}
				x.DecryptSectors(got, cipherText, 0)
				if !bytes.Equal(got, plain) {
					t.Errorf("%v: decrypting dm-crypt's ciphertext fails", impl)
				}
				// Second sector alone, at its 512-byte position.
				ss := c.sectorSize
				one := make([]byte, ss)
				x.DecryptSectors(one, cipherText[ss:2*ss], uint64(ss/512))
				if !bytes.Equal(one, plain[ss:2*ss]) {
					t.Errorf("%v: second sector at firstSector %d decrypts wrong", impl, ss/512)
				}
			}
		})
	}
}
