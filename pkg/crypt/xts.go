// Package crypt holds the cryptography of csi-encdisk: the AES-XTS sector
// engine that encrypts volume data exactly as dm-crypt's aes-xts-plain64
// does, and the LUKS2 header format (read, write, keyslots, tokens).
//
// It imports nothing else of the project.
package crypt

import (
	"crypto/subtle"
	"errors"
	"fmt"
	"unsafe"
)

// KernelSectorSize is the unit the kernel (and dm-crypt's plain64 IV) counts
// sectors in, whatever the volume's logical sector size.
const KernelSectorSize = 512

// xtsImpl names one implementation of the XTS block loop. Tests force each
// one the machine supports through newXTSImpl.
type xtsImpl int

const (
	// implGeneric is portable Go on top of crypto/aes.
	implGeneric xtsImpl = iota
	// implAESNI is amd64 assembly with AES-NI on 128-bit registers,
	// 8 blocks in flight.
	implAESNI
	// implVAES is amd64 assembly with VAES and VPCLMULQDQ on 256-bit
	// registers (two blocks per instruction), 16 blocks in flight.
	implVAES
)

func (i xtsImpl) String() string {
	switch i {
	case implGeneric:
		return "generic"
	case implAESNI:
		return "aesni"
	case implVAES:
		return "vaes"
	}
	return fmt.Sprintf("xtsImpl(%d)", int(i))
}

// XTS encrypts and decrypts whole sectors of a volume's data segment with
// AES-XTS and dm-crypt's plain64 IV convention. It is safe for concurrent
// use: after NewXTS it holds only read-only key material, and each call keeps
// its working state in registers and on its own stack.
type XTS struct {
	sectorSize int
	step       uint64 // sectorSize / 512: tweak increment per data unit
	impl       xtsImpl
	gen        genericXTS  // used by implGeneric
	ks         keySchedule // used by the assembly implementations
}

// NewXTS returns an XTS engine for key (32 bytes: AES-128-XTS, 64 bytes:
// AES-256-XTS) and sectorSize (512 or 4096). Keys whose two halves are equal
// are refused, as IEEE 1619-2018, FIPS 140 and OpenSSL require. The fastest
// implementation the CPU supports is chosen.
func NewXTS(key []byte, sectorSize int) (*XTS, error) {
	return newXTSImpl(key, sectorSize, bestImpl())
}

// newXTSImpl is NewXTS with a forced implementation, which must be one of
// supportedImpls().
func newXTSImpl(key []byte, sectorSize int, impl xtsImpl) (*XTS, error) {
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
	return buildXTS(key, sectorSize, impl)
}

// buildXTS makes the engine without the equal-halves check, which only
// tests use directly (IEEE 1619 vector 1 has an all-zero key).
func buildXTS(key []byte, sectorSize int, impl xtsImpl) (*XTS, error) {
	half := len(key) / 2
	x := &XTS{sectorSize: sectorSize, step: uint64(sectorSize / KernelSectorSize), impl: impl}
	switch {
	case impl == implGeneric:
		if err := x.gen.init(key[:half], key[half:]); err != nil {
			return nil, err
		}
	case implSupported(impl):
		x.ks.init(key[:half], key[half:])
	default:
		return nil, fmt.Errorf("crypt: XTS implementation %v not supported on this CPU", impl)
	}
	return x, nil
}

// SectorSize returns the data unit size in bytes.
func (x *XTS) SectorSize() int { return x.sectorSize }

// EncryptSectors encrypts src into dst (which may be src). len(src) must be a
// multiple of the sector size and dst at least as long. firstSector is the
// position of src[0] in the data segment in 512-byte units; it must be a
// multiple of SectorSize()/512. Each sector's tweak is its own position in
// 512-byte units (plain64 without iv_large_sectors).
func (x *XTS) EncryptSectors(dst, src []byte, firstSector uint64) {
	x.check(dst, src, firstSector)
	x.crypt(dst[:len(src)], src, x.sectorSize, firstSector, x.step, false)
}

// DecryptSectors is the inverse of EncryptSectors, with the same rules.
func (x *XTS) DecryptSectors(dst, src []byte, firstSector uint64) {
	x.check(dst, src, firstSector)
	x.crypt(dst[:len(src)], src, x.sectorSize, firstSector, x.step, true)
}

// cryptUnit encrypts or decrypts one data unit of any whole number of
// 16-byte blocks with the given tweak (the data unit sequence number). Tests
// use it for IEEE 1619 vectors whose data units are not sectors.
func (x *XTS) cryptUnit(dst, src []byte, tweak uint64, decrypt bool) {
	if len(src) == 0 || len(src)%16 != 0 || len(dst) < len(src) {
		panic("crypt: XTS data unit must be a non-empty multiple of 16 bytes")
	}
	checkOverlap(dst, src)
	x.crypt(dst[:len(src)], src, len(src), tweak, 0, decrypt)
}

// crypt runs the chosen implementation over len(src)/unit data units; the
// first has tweak tweak, each next one tweak+step. len(dst) == len(src).
func (x *XTS) crypt(dst, src []byte, unit int, tweak, step uint64, decrypt bool) {
	if len(src) == 0 {
		return
	}
	if x.impl == implGeneric {
		x.gen.crypt(dst, src, unit, tweak, step, decrypt)
		return
	}
	x.cryptAsm(dst, src, unit, tweak, step, decrypt)
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
	checkOverlap(dst, src)
}

// checkOverlap panics if dst and src overlap other than exactly (in-place
// is fine; a shifted overlap would read blocks already overwritten), as
// crypto/cipher does.
func checkOverlap(dst, src []byte) {
	if len(src) == 0 {
		return
	}
	d := uintptr(unsafe.Pointer(unsafe.SliceData(dst)))
	s := uintptr(unsafe.Pointer(unsafe.SliceData(src)))
	if d != s && d < s+uintptr(len(src)) && s < d+uintptr(len(src)) {
		panic("crypt: XTS invalid buffer overlap")
	}
}
