// Package crypt holds the cryptography of csi-encdisk: the AES-XTS sector
// engine that encrypts volume data exactly as dm-crypt's aes-xts-plain64
// does, and the LUKS2 header format (read, write, keyslots, tokens).
//
// It imports nothing else of the project.
package crypt

import (
	"crypto/aes"
	"crypto/subtle"
	"errors"
	"fmt"

	"golang.org/x/crypto/xts"
)

// KernelSectorSize is the unit the kernel (and dm-crypt's plain64 IV) counts
// sectors in, whatever the volume's logical sector size.
const KernelSectorSize = 512

// XTS encrypts and decrypts whole sectors of a volume's data segment with
// AES-XTS and dm-crypt's plain64 IV convention. It is safe for concurrent use.
type XTS struct {
	sectorSize int
	step       uint64 // sectorSize / 512: tweak increment per data unit
	c          *xts.Cipher
}

// NewXTS returns an XTS engine for key (32 bytes: AES-128-XTS, 64 bytes:
// AES-256-XTS) and sectorSize (512 or 4096). Keys whose two halves are equal
// are refused, as IEEE 1619-2018, FIPS 140 and OpenSSL require.
func NewXTS(key []byte, sectorSize int) (*XTS, error) {
	if len(key) != 32 && len(key) != 64 {
		return nil, fmt.Errorf("crypt: XTS key must be 32 or 64 bytes, got %d", len(key))
	}
	if sectorSize != 512 && sectorSize != 4096 {
		return nil, fmt.Errorf("crypt: XTS sector size must be 512 or 4096, got %d", sectorSize)
	}
	half := len(key) / 2
	if subtle.ConstantTimeCompare(key[:half], key[half:]) == 1 {
		return nil, errors.New("crypt: XTS key halves are equal (refused: it voids XTS security)")
	}
	c, err := xts.NewCipher(aes.NewCipher, key)
	if err != nil {
		return nil, fmt.Errorf("crypt: XTS key: %w", err)
	}
	return &XTS{sectorSize: sectorSize, step: uint64(sectorSize / KernelSectorSize), c: c}, nil
}

// SectorSize returns the data unit size in bytes.
func (x *XTS) SectorSize() int { return x.sectorSize }

// EncryptSectors encrypts src into dst (which may be src). len(src) must be a
// multiple of the sector size and dst at least as long. firstSector is the
// position of src[0] in the data segment in 512-byte units; it must be a
// multiple of SectorSize()/512.
func (x *XTS) EncryptSectors(dst, src []byte, firstSector uint64) {
	x.check(dst, src, firstSector)
	for off := 0; off < len(src); off += x.sectorSize {
		x.c.Encrypt(dst[off:off+x.sectorSize], src[off:off+x.sectorSize], firstSector)
		firstSector += x.step
	}
}

// DecryptSectors is the inverse of EncryptSectors, with the same rules.
func (x *XTS) DecryptSectors(dst, src []byte, firstSector uint64) {
	x.check(dst, src, firstSector)
	for off := 0; off < len(src); off += x.sectorSize {
		x.c.Decrypt(dst[off:off+x.sectorSize], src[off:off+x.sectorSize], firstSector)
		firstSector += x.step
	}
}

func (x *XTS) check(dst, src []byte, firstSector uint64) {
	if len(src)%x.sectorSize != 0 {
		panic("crypt: XTS input not a multiple of the sector size")
	}
	if len(dst) < len(src) {
		panic("crypt: XTS output smaller than input")
	}
	if firstSector%x.step != 0 {
		panic("crypt: XTS firstSector not aligned to the sector size")
	}
}
