package crypt

import (
	"bytes"
	"math/rand/v2"
	"os/exec"
	"strconv"
	"testing"
)

// opensslXTS is a Python program that encrypts or decrypts sectors with
// OpenSSL's EVP aes-xts through the `cryptography` package. stdin: the key
// (32 or 64 bytes), then the data; argv: sector size, first sector (512-byte
// units), "enc" or "dec". stdout: the result.
const opensslXTS = `
import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
ss, first, op, klen = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
raw = sys.stdin.buffer.read()
key, data = raw[:klen], raw[klen:]
out = bytearray()
for off in range(0, len(data), ss):
    tweak = ((first + off // 512) % (1 << 64)).to_bytes(16, "little")
    c = Cipher(algorithms.AES(key), modes.XTS(tweak))
    ctx = c.decryptor() if op == "dec" else c.encryptor()
    out += ctx.update(data[off:off + ss]) + ctx.finalize()
sys.stdout.buffer.write(out)
`

// pythonWithCryptography finds a Python that can import cryptography:
// /usr/bin/python3 first (apt python3-cryptography, scripts/install-deps.sh),
// then python3 on PATH. The test fails when there is none.
func pythonWithCryptography(t *testing.T) string {
	t.Helper()
	for _, p := range []string{"/usr/bin/python3", "python3"} {
		path, err := exec.LookPath(p)
		if err != nil {
			continue
		}
		if exec.Command(path, "-c", "import cryptography.hazmat.primitives.ciphers").Run() == nil {
			return path
		}
	}
	t.Fatal("no python3 with the cryptography package (OpenSSL oracle); run scripts/install-deps.sh (apt python3-cryptography)")
	return ""
}

func opensslSectors(t *testing.T, py string, key, data []byte, ss int, first uint64, op string) []byte {
	t.Helper()
	cmd := exec.Command(py, "-c", opensslXTS, strconv.Itoa(ss), strconv.FormatUint(first, 10), op, strconv.Itoa(len(key)))
	cmd.Stdin = bytes.NewReader(append(bytes.Clone(key), data...))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("OpenSSL oracle: %v: %s", err, stderr.String())
	}
	if len(out) != len(data) {
		t.Fatalf("OpenSSL oracle returned %d bytes for %d", len(out), len(data))
	}
	return out
}

// TestXTSCrossCheckOpenSSL compares every implementation with OpenSSL's
// EVP aes-128-xts and aes-256-xts, both directions, both sector sizes.
func TestXTSCrossCheckOpenSSL(t *testing.T) {
	py := pythonWithCryptography(t)
	r := rand.New(rand.NewPCG(11, 11))
	for _, keyLen := range []int{32, 64} {
		for _, ss := range []int{512, 4096} {
			key := xtsRandKey(r, keyLen)
			nsec := 3 + r.IntN(6)
			if ss == 512 {
				nsec += 40
			}
			data := xtsRandBytes(r, nsec*ss)
			first := xtsRandSector(r, uint64(ss/512))
			wantCT := opensslSectors(t, py, key, data, ss, first, "enc")
			wantPT := opensslSectors(t, py, key, data, ss, first, "dec")
			for _, impl := range supportedImpls() {
				x := xtsMust(t, key, ss, impl)
				got := make([]byte, len(data))
				x.EncryptSectors(got, data, first)
				if !bytes.Equal(got, wantCT) {
					t.Errorf("%v, %d-byte key, sector %d, first %d: encryption differs from OpenSSL", impl, keyLen, ss, first)
				}
				x.DecryptSectors(got, data, first)
				if !bytes.Equal(got, wantPT) {
					t.Errorf("%v, %d-byte key, sector %d, first %d: decryption differs from OpenSSL", impl, keyLen, ss, first)
				}
			}
		}
	}
}
