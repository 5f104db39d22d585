package crypt

import (
	"bytes"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"hash"
	"testing"

	"golang.org/x/crypto/pbkdf2"
)

// pbkdf2Key agrees with x/crypto/pbkdf2 (an independent implementation) on
// random inputs, every hash LUKS2 uses, and lengths across block edges.
func TestPBKDF2MatchesXCrypto(t *testing.T) {
	for _, h := range []func() hash.Hash{sha1.New, sha256.New, sha512.New} {
		for _, keyLen := range []int{1, 16, 20, 32, 33, 64, 65, 100} {
			pass, salt := make([]byte, keyLen%40+1), make([]byte, 32)
			rand.Read(pass)
			rand.Read(salt)
			want := pbkdf2.Key(pass, salt, 7, keyLen, h)
			if got := pbkdf2Key(pass, salt, 7, keyLen, h); !bytes.Equal(got, want) {
				t.Fatalf("keyLen %d: got %x want %x", keyLen, got, want)
			}
		}
	}
	// RFC 6070 vector (PBKDF2-HMAC-SHA1, "password"/"salt", 4096 rounds).
	want := []byte{0x4b, 0x00, 0x79, 0x01, 0xb7, 0x65, 0x48, 0x9a, 0xbe, 0xad, 0x49, 0xd9, 0x26, 0xf7, 0x21, 0xd0, 0x65, 0xa4, 0x29, 0xc1}
	if got := pbkdf2Key([]byte("password"), []byte("salt"), 4096, 20, sha1.New); !bytes.Equal(got, want) {
		t.Fatalf("RFC 6070 vector: %x", got)
	}
}
