package crypt

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
)

// validate checks the metadata for consistency with itself and the binary
// header, bounding every size so that later reads stay small: the config,
// then each part in its own function (keyslots, the data segment, digests,
// tokens).
func (h *Header) validate() error {
	m := &h.meta
	c := m.Config
	if uint64(c.JSONSize) != h.hdrSize-binHeaderSize {
		return fmt.Errorf("config json_size %d, want %d", c.JSONSize, h.hdrSize-binHeaderSize)
	}
	if c.KeyslotsSize%4096 != 0 || uint64(c.KeyslotsSize) > 1<<40 {
		return fmt.Errorf("config keyslots_size %d not a multiple of 4096 or absurd", c.KeyslotsSize)
	}
	if len(m.Keyslots) > maxKeyslots || len(m.Tokens) > maxTokens || len(m.Digests) > maxKeyslots || len(m.Segments) > maxKeyslots {
		return errors.New("too many keyslots, tokens, digests or segments")
	}
	areaStart := 2 * h.hdrSize
	areaEnd := areaStart + uint64(c.KeyslotsSize)
	if err := h.validateKeyslots(areaStart, areaEnd); err != nil {
		return err
	}
	if err := h.validateSegment(areaEnd); err != nil {
		return err
	}
	if err := h.validateDigests(); err != nil {
		return err
	}
	return h.validateTokens()
}

// validateKeyslots checks every keyslot of type luks2: sizes, splitter,
// area inside the keyslots area [areaStart, areaEnd), and bounded KDF costs.
func (h *Header) validateKeyslots(areaStart, areaEnd uint64) error {
	m := &h.meta
	for id, ks := range m.Keyslots {
		if ks == nil {
			return fmt.Errorf("keyslot %s is null", id)
		}
		if err := checkID(id); err != nil {
			return fmt.Errorf("keyslot id: %w", err)
		}
		if ks.Type != "luks2" {
			// Other types (e.g. reencrypt) carry no key we open; they
			// must still be well formed enough to bound.
			if ks.Type == "" {
				return fmt.Errorf("keyslot %s has no type", id)
			}
			continue
		}
		if ks.KeySize <= 0 || ks.KeySize > maxKeySize {
			return fmt.Errorf("keyslot %s key_size %d", id, ks.KeySize)
		}
		if ks.AF.Type != "luks1" || ks.AF.Stripes <= 0 || ks.AF.Stripes > maxStripes {
			return fmt.Errorf("keyslot %s anti-forensic splitter %q with %d stripes", id, ks.AF.Type, ks.AF.Stripes)
		}
		if _, err := hashByName(ks.AF.Hash); err != nil {
			return fmt.Errorf("keyslot %s af hash: %w", id, err)
		}
		if ks.Area.Type != "raw" || ks.Area.KeySize <= 0 || ks.Area.KeySize > maxKeySize {
			return fmt.Errorf("keyslot %s area type %q key_size %d", id, ks.Area.Type, ks.Area.KeySize)
		}
		need := afSectors(ks.KeySize, ks.AF.Stripes) * 512
		off, size := uint64(ks.Area.Offset), uint64(ks.Area.Size)
		if size < need || off < areaStart || off > areaEnd || size > areaEnd-off || off%512 != 0 {
			return fmt.Errorf("keyslot %s area [%d, +%d) outside the keyslots area [%d, %d) or too small", id, off, size, areaStart, areaEnd)
		}
		switch ks.KDF.Type {
		case "pbkdf2":
			if _, err := hashByName(ks.KDF.Hash); err != nil {
				return fmt.Errorf("keyslot %s kdf hash: %w", id, err)
			}
			if ks.KDF.Iterations <= 0 || ks.KDF.Iterations > maxPBKDF2Iterations {
				return fmt.Errorf("keyslot %s kdf iterations %d (1 to %d)", id, ks.KDF.Iterations, maxPBKDF2Iterations)
			}
		case "argon2i", "argon2id":
			if ks.KDF.Time <= 0 || ks.KDF.Time > maxArgonTime || ks.KDF.Memory <= 0 || ks.KDF.Memory > maxArgonMemoryKiB || ks.KDF.CPUs <= 0 || ks.KDF.CPUs > 255 {
				return fmt.Errorf("keyslot %s argon2 parameters time %d memory %d cpus %d", id, ks.KDF.Time, ks.KDF.Memory, ks.KDF.CPUs)
			}
		default:
			return fmt.Errorf("keyslot %s kdf type %q (pbkdf2, argon2i, argon2id)", id, ks.KDF.Type)
		}
		if len(ks.KDF.Salt) == 0 || len(ks.KDF.Salt) > 1024 {
			return fmt.Errorf("keyslot %s kdf salt of %d bytes", id, len(ks.KDF.Salt))
		}
	}
	return nil
}

// validateSegment checks segment 0 (the only one the engine serves) and
// records it and the data offset.
func (h *Header) validateSegment(areaEnd uint64) error {
	m := &h.meta
	c := m.Config
	seg, ok := m.Segments["0"]
	if !ok || seg == nil {
		return errors.New("no segment 0")
	}
	if seg.Type != "crypt" {
		return fmt.Errorf("segment 0 type %q, want crypt", seg.Type)
	}
	if seg.SectorSize != 512 && seg.SectorSize != 4096 {
		return fmt.Errorf("segment 0 sector_size %d (this engine serves 512 or 4096)", seg.SectorSize)
	}
	// What the data path does not implement must not be opened as if it
	// were plain aes-xts-plain64 over the whole data area: an image in the
	// middle of a reencryption (several segments, mandatory requirements),
	// dm-integrity, or an IV offset.
	if len(m.Segments) != 1 {
		return fmt.Errorf("%d segments (an unfinished reencryption?); only one crypt segment is supported", len(m.Segments))
	}
	if seg.Integrity != nil {
		return errors.New("segment 0 uses integrity protection, which is not supported")
	}
	if seg.IVTweak != "" && seg.IVTweak != "0" {
		return fmt.Errorf("segment 0 iv_tweak %q is not supported (only 0)", seg.IVTweak)
	}
	if req, ok := c.Requirements.(map[string]any); ok {
		if mand, ok := req["mandatory"].([]any); ok && len(mand) > 0 {
			return fmt.Errorf("config requires %v, which is not supported", mand)
		}
	}
	if uint64(seg.Offset) < areaEnd || uint64(seg.Offset)%512 != 0 || uint64(seg.Offset) > 1<<50 {
		return fmt.Errorf("segment 0 offset %d overlaps the metadata or is misaligned", seg.Offset)
	}
	if seg.Size != "dynamic" {
		if _, err := strconv.ParseUint(seg.Size, 10, 64); err != nil {
			return fmt.Errorf("segment 0 size %q", seg.Size)
		}
	}
	if seg.IVTweak != "" {
		if _, err := strconv.ParseUint(seg.IVTweak, 10, 64); err != nil {
			return fmt.Errorf("segment 0 iv_tweak %q", seg.IVTweak)
		}
	}
	h.segment = seg
	h.dataOffset = int64(seg.Offset)
	return nil
}

// validateDigests checks the digests and records the one bound to segment 0.
func (h *Header) validateDigests() error {
	m := &h.meta
	for id, d := range m.Digests {
		if d == nil {
			return fmt.Errorf("digest %s is null", id)
		}
		if d.Type != "pbkdf2" {
			return fmt.Errorf("digest %s type %q, want pbkdf2", id, d.Type)
		}
		if _, err := hashByName(d.Hash); err != nil {
			return fmt.Errorf("digest %s hash: %w", id, err)
		}
		if d.Iterations <= 0 || d.Iterations > maxPBKDF2Iterations || len(d.Digest) == 0 || len(d.Digest) > 64 || len(d.Salt) == 0 || len(d.Salt) > 1024 {
			return fmt.Errorf("digest %s parameters", id)
		}
		for _, k := range d.Keyslots {
			if _, ok := m.Keyslots[k]; !ok {
				return fmt.Errorf("digest %s names missing keyslot %s", id, k)
			}
		}
		for _, s := range d.Segments {
			if _, ok := m.Segments[s]; !ok {
				return fmt.Errorf("digest %s names missing segment %s", id, s)
			}
			if s == "0" {
				h.segDigest = id
			}
		}
	}
	if h.segDigest == "" {
		return errors.New("no digest is bound to segment 0")
	}
	return nil
}

// validateTokens checks that every token is well formed and names existing
// keyslots.
func (h *Header) validateTokens() error {
	m := &h.meta
	for id, raw := range m.Tokens {
		var t struct {
			Type     string   `json:"type"`
			Keyslots []string `json:"keyslots"`
		}
		if err := json.Unmarshal(raw, &t); err != nil || t.Type == "" {
			return fmt.Errorf("token %s malformed", id)
		}
		for _, k := range t.Keyslots {
			if _, ok := m.Keyslots[k]; !ok {
				return fmt.Errorf("token %s names missing keyslot %s", id, k)
			}
		}
	}
	return nil
}
