package crypt

import (
	"crypto/subtle"
	"fmt"

	"golang.org/x/crypto/argon2"
)

// deriveKeyslotKey runs the keyslot's KDF over the passphrase.
func deriveKeyslotKey(kdf *jsonKDF, passphrase []byte, keyLen int) ([]byte, error) {
	switch kdf.Type {
	case "pbkdf2":
		hf, err := hashByName(kdf.Hash)
		if err != nil {
			return nil, err
		}
		return pbkdf2Key(passphrase, kdf.Salt, kdf.Iterations, keyLen, hf), nil
	case "argon2i":
		return argon2.Key(passphrase, kdf.Salt, uint32(kdf.Time), uint32(kdf.Memory), uint8(kdf.CPUs), uint32(keyLen)), nil
	case "argon2id":
		return argon2.IDKey(passphrase, kdf.Salt, uint32(kdf.Time), uint32(kdf.Memory), uint8(kdf.CPUs), uint32(keyLen)), nil
	}
	return nil, fmt.Errorf("unsupported kdf %q", kdf.Type)
}

// keyslotCipher returns the XTS engine for a keyslot area. Keyslot areas are
// encrypted in 512-byte sectors whose IVs count from the start of the area.
func keyslotCipher(encryption string, key []byte) (*XTS, error) {
	if encryption != "aes-xts-plain64" {
		return nil, fmt.Errorf("keyslot area encryption %q is not supported (aes-xts-plain64)", encryption)
	}
	return NewXTS(key, 512)
}

// digestMatches checks a candidate volume key against a pbkdf2 digest in
// constant time.
func digestMatches(d *jsonDigest, key []byte) (bool, error) {
	hf, err := hashByName(d.Hash)
	if err != nil {
		return false, err
	}
	sum := pbkdf2Key(key, d.Salt, d.Iterations, len(d.Digest), hf)
	return subtle.ConstantTimeCompare(sum, d.Digest) == 1, nil
}

// Unlock returns the volume key of the data segment, opened with
// passphrase through any keyslot bound to the segment's digest. A passphrase
// that opens none gives ErrWrongPassphrase. The caller owns (and should zero)
// the returned key.
func (h *Header) Unlock(passphrase []byte) ([]byte, error) {
	d := h.meta.Digests[h.segDigest]
	var lastErr error
	for _, id := range sortedIDs(h.meta.Keyslots) {
		if !contains(d.Keyslots, id) {
			continue
		}
		ks := h.meta.Keyslots[id]
		if ks.Type != "luks2" || (ks.Priority != nil && *ks.Priority == 0) {
			continue
		}
		key, err := h.openKeyslot(ks, passphrase)
		if err != nil {
			lastErr = fmt.Errorf("keyslot %s: %w", id, err)
			continue
		}
		ok, err := digestMatches(d, key)
		if err != nil {
			clear(key)
			return nil, fmt.Errorf("crypt: digest %s: %w", h.segDigest, err)
		}
		if ok {
			return key, nil
		}
		clear(key)
	}
	if lastErr != nil {
		return nil, fmt.Errorf("crypt: %w", lastErr)
	}
	return nil, ErrWrongPassphrase
}

// openKeyslot derives the area key, decrypts the keyslot area and merges
// the anti-forensic stripes into a candidate volume key.
func (h *Header) openKeyslot(ks *jsonKeyslot, passphrase []byte) ([]byte, error) {
	areaKey, err := deriveKeyslotKey(&ks.KDF, passphrase, ks.Area.KeySize)
	if err != nil {
		return nil, err
	}
	defer clear(areaKey)
	c, err := keyslotCipher(ks.Area.Encryption, areaKey)
	if err != nil {
		return nil, err
	}
	defer c.Wipe()
	buf := make([]byte, afSectors(ks.KeySize, ks.AF.Stripes)*512)
	defer clear(buf)
	if _, err := h.r.ReadAt(buf, int64(ks.Area.Offset)); err != nil {
		return nil, fmt.Errorf("read keyslot area: %w", err)
	}
	c.DecryptSectors(buf, buf, 0)
	hf, err := hashByName(ks.AF.Hash)
	if err != nil {
		return nil, err
	}
	return afMerge(buf, ks.KeySize, ks.AF.Stripes, hf), nil
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}
