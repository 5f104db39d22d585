package crypt

import (
	"crypto/hmac"
	"encoding/binary"
	"hash"
)

// pbkdf2Key is PBKDF2 (RFC 8018, section 5.2) with HMAC over h. It exists
// because the standard library's crypto/pbkdf2 (and x/crypto/pbkdf2, which
// calls it) takes the password as a string: every call leaves an immutable
// copy of the passphrase or volume key on the heap that no one can wipe.
// Here the secret only ever sits in the HMAC's pads (XORed with constants,
// as every HMAC keeps its key); intermediate blocks are wiped. It is
// checked against x/crypto/pbkdf2 and by every cryptsetup-made keyslot the
// tests unlock.
func pbkdf2Key(password, salt []byte, iter, keyLen int, h func() hash.Hash) []byte {
	prf := hmac.New(h, password)
	hLen := prf.Size()
	blocks := (keyLen + hLen - 1) / hLen
	out := make([]byte, 0, blocks*hLen)
	var counter [4]byte
	u := make([]byte, 0, hLen)
	t := make([]byte, hLen)
	defer clear(t)
	for block := 1; block <= blocks; block++ {
		prf.Reset()
		prf.Write(salt)
		binary.BigEndian.PutUint32(counter[:], uint32(block))
		prf.Write(counter[:])
		u = prf.Sum(u[:0])
		copy(t, u)
		for n := 2; n <= iter; n++ {
			prf.Reset()
			prf.Write(u)
			u = prf.Sum(u[:0])
			for i := range t {
				t[i] ^= u[i]
			}
		}
		out = append(out, t...)
	}
	clear(u[:cap(u)])
	prf.Reset()
	return out[:keyLen]
}
