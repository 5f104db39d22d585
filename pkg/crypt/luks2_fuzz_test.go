package crypt

import (
	"bytes"
	"os"
	"testing"
)

// FuzzReadHeader feeds arbitrary bytes to the header parser: it must return
// an error or a header, never panic, and never allocate without bound (every
// size it reads is checked against LUKS2 limits before use). The seed corpus
// in testdata/fuzz/FuzzReadHeader holds the two header copies of images made
// by our Format and by cryptsetup. Run it with -fuzzminimizetime 100x: the
// seeds are 32 KiB (two header copies) and minimising inputs that size by
// time stalls the fuzzer for minutes.
func FuzzReadHeader(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte("LUKS\xba\xbe\x00\x02"))
	f.Fuzz(func(t *testing.T, data []byte) {
		h, err := ReadHeader(bytes.NewReader(data))
		if err != nil {
			return
		}
		// A header that parses answers every accessor without panicking.
		_ = h.DataOffset() + int64(h.SectorSize()+h.KeySize())
		_, _ = h.KMSToken()
		_ = h.Tokens()
		_ = h.Cipher() + h.UUID() + h.Damaged()
		// Unlock reads keyslot areas; with a wrong passphrase it must fail
		// cleanly. Skip costly KDFs so the fuzzer stays fast.
		for _, ks := range h.meta.Keyslots {
			if ks.KDF.Type != "pbkdf2" || ks.KDF.Iterations > 2000 {
				return
			}
		}
		if d := h.meta.Digests[h.segDigest]; d.Iterations > 2000 {
			return
		}
		_, _ = h.Unlock([]byte("fuzz"))
	})
}

// TestFuzzSeedsParse checks that the committed seeds made by our Format and by
// cryptsetup really are valid headers, so the fuzzer starts from good input.
func TestFuzzSeedsParse(t *testing.T) {
	for _, name := range []string{"testdata/luks2-ours-4096.hdr", "testdata/luks2-cryptsetup-argon2id-512.hdr"} {
		data, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ReadHeader(bytes.NewReader(data)); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}
