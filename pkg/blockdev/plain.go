package blockdev

import (
	"errors"
	"fmt"

	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
)

// sectorCipher is what the engine's data path does to whole sectors between
// the FUSE file and the image: the volume's XTS cipher (*crypt.XTS), or
// plainCipher for an unencrypted volume. The sector numbers are in 512-byte
// units from the start of the data segment (dm-crypt's plain64 IVs).
type sectorCipher interface {
	EncryptSectors(dst, src []byte, firstSector uint64)
	DecryptSectors(dst, src []byte, firstSector uint64)
}

var _ sectorCipher = (*crypt.XTS)(nil)

// plainCipher is the sector transform of a plaintext engine
// (EngineSpec.Plaintext): the bytes pass as they are. The engine works in
// place (dst and src are the same buffer), so it costs one call and nothing
// else.
type plainCipher struct{}

// EncryptSectors copies src to dst (nothing when they are the same bytes).
func (plainCipher) EncryptSectors(dst, src []byte, _ uint64) { samePlace(dst, src) }

// DecryptSectors copies src to dst (nothing when they are the same bytes).
func (plainCipher) DecryptSectors(dst, src []byte, _ uint64) { samePlace(dst, src) }

func samePlace(dst, src []byte) {
	if len(src) > 0 && &dst[0] != &src[0] {
		copy(dst, src)
	}
}

// recordedImage is an image that carries its volume's metadata, as the
// controller recorded it (an RBD image: its csi-encdisk.meta key). For
// such an image the record, not the image's first bytes, says whether the
// volume is encrypted.
type recordedImage interface {
	// RecordedEncrypted returns the record's encrypted flag; recorded is
	// false when the image has no record (an image made by hand).
	RecordedEncrypted() (encrypted, recorded bool, err error)
}

// checkMode refuses to serve an image in a mode other than the one its
// volume was made with. The mode is chosen by the caller (spec.Plaintext,
// from the volume context), never guessed from the image: this check only
// confirms it, so that an encrypted volume is never served raw and an
// unencrypted one is never unlocked (a LUKS2 header that a user wrote into
// a plaintext volume is its data). The volume's record decides where there
// is one; an image file has none, and its own LUKS2 header is its record
// (as for the file pool's volumes). A plaintext engine needs a record
// that says unencrypted (or, for a file, no LUKS2 header); an encrypted
// engine on an image without a record reads the header as before.
func checkMode(spec EngineSpec, img imageIO) error {
	want := !spec.Plaintext
	if r, ok := img.(recordedImage); ok {
		enc, recorded, err := r.RecordedEncrypted()
		switch {
		case err != nil:
			return fmt.Errorf("engine: read the volume record of %s: %w", spec.Image, err)
		case !recorded && spec.Plaintext:
			return fmt.Errorf("%w: %s has no volume record, and only an image recorded as unencrypted is served in plaintext", ErrEncryptionMismatch, spec.Image)
		case recorded && enc != want:
			return fmt.Errorf("%w: the engine was asked to serve %s %s, and its volume record says encrypted=%t", ErrEncryptionMismatch,
				spec.Image, map[bool]string{true: "encrypted", false: "in plaintext"}[want], enc)
		}
		return nil
	}
	if !spec.Plaintext {
		return nil // the header read by unlockImage decides
	}
	_, err := crypt.ReadHeader(img)
	switch {
	case err == nil:
		return fmt.Errorf("%w: the engine was asked to serve %s in plaintext, and it has a LUKS2 header", ErrEncryptionMismatch, spec.Image)
	case errors.Is(err, crypt.ErrNotLUKS2):
		return nil
	default:
		return fmt.Errorf("engine: read the start of %s: %w", spec.Image, err)
	}
}
