package crypt

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"fmt"
)

// genericXTS is the portable implementation: XTS on top of crypto/aes
// (which itself uses the CPU's AES instructions where Go has them).
type genericXTS struct {
	k1, k2 cipher.Block // data key, tweak key
}

func (g *genericXTS) init(k1, k2 []byte) error {
	var err error
	if g.k1, err = aes.NewCipher(k1); err != nil {
		return fmt.Errorf("crypt: XTS data key: %w", err)
	}
	if g.k2, err = aes.NewCipher(k2); err != nil {
		return fmt.Errorf("crypt: XTS tweak key: %w", err)
	}
	return nil
}

// crypt processes data units of unit bytes. It never takes the address of a
// local buffer (the block cipher is an interface, so that would move it to
// the heap): the tweak is encrypted in dst's first block, after src's first
// block has been read, which keeps in-place use correct.
func (g *genericXTS) crypt(dst, src []byte, unit int, tweak, step uint64, decrypt bool) {
	le := binary.LittleEndian
	for off := 0; off < len(src); off += unit {
		d := dst[off : off+unit]
		s := src[off : off+unit]
		p0, p1 := le.Uint64(s[0:]), le.Uint64(s[8:])
		le.PutUint64(d[0:], tweak)
		le.PutUint64(d[8:], 0)
		g.k2.Encrypt(d[:16], d[:16])
		t0, t1 := le.Uint64(d[0:]), le.Uint64(d[8:])
		for i := 0; i < unit; i += 16 {
			if i > 0 {
				p0, p1 = le.Uint64(s[i:]), le.Uint64(s[i+8:])
			}
			b := d[i : i+16]
			le.PutUint64(b[0:], p0^t0)
			le.PutUint64(b[8:], p1^t1)
			if decrypt {
				g.k1.Decrypt(b, b)
			} else {
				g.k1.Encrypt(b, b)
			}
			le.PutUint64(b[0:], le.Uint64(b[0:])^t0)
			le.PutUint64(b[8:], le.Uint64(b[8:])^t1)
			// Multiply the tweak by x in GF(2^128) (polynomial
			// x^128+x^7+x^2+x+1), without a branch on its bits.
			carry := t1 >> 63
			t1 = t1<<1 | t0>>63
			t0 = t0<<1 ^ (0x87 & -carry)
		}
		tweak += step
	}
}
