package crypt

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
)

// DefaultPBKDF2Iterations is the iteration count of the keyslot KDF (when
// FormatOptions.Argon2 is nil) and of the volume key digest in headers we
// write. It is deliberately low, and that is safe for the driver's own
// keyslots: their passphrase is 256 bits from a CSPRNG, stored only wrapped
// by the KMS, so guessing it means 2^255 tries on average whatever the KDF
// costs (stretching a key that cannot be guessed adds nothing), while every
// stage would pay for it. The digest is over the 512-bit random volume key,
// likewise unguessable. 1000 is the minimum cryptsetup accepts for pbkdf2.
// A passphrase a person chose is another matter: give FormatOptions.Argon2
// (see MeasureArgon2id), as `volume format` does unless told the key file
// is machine-random.
const DefaultPBKDF2Iterations = 1000

const afStripes = 4000

// KMS v2 API limits on what a plugin's Encrypt may return
// (k8s.io/kms/apis/v2, enforced by kube-apiserver): the token of a header
// must hold the largest such answer.
const (
	MaxKMSCiphertext  = 1024
	MaxKMSKeyID       = 1024
	MaxKMSAnnotations = 32 * 1024 // keys and values together
)

// KMSHeaderSize is the size of one header copy (4 KiB binary header and
// 124 KiB of JSON metadata) that makes room for a csi-encdisk-kms token of
// the largest answer the KMS v2 API allows: a 1 KiB ciphertext (1.4 KiB in
// base64), a 1 KiB key_id (6 KiB if every byte needs a JSON escape) and
// 32 KiB of annotations (at most 3x that in JSON: keys are domain names of
// at least 3 bytes, each costing 6 bytes of quotes and separators, values
// grow by 4/3 in base64): about 108 KiB. cryptsetup accepts metadata sizes
// of 16 KiB to 4 MiB in powers of two (--luks2-metadata-size).
const KMSHeaderSize = 128 << 10

// FormatOptions are the parameters of a new LUKS2 image.
type FormatOptions struct {
	// SectorSize is the data segment's encryption sector size: 512 or 4096.
	SectorSize int
	// VolumeKey is the aes-xts-plain64 key: 64 bytes (or 32 for AES-128).
	VolumeKey []byte
	// Passphrase unlocks keyslot 0.
	Passphrase []byte
	// PBKDF2Iterations overrides DefaultPBKDF2Iterations when > 0.
	PBKDF2Iterations int
	// Argon2, when set, makes keyslot 0 an argon2id keyslot of that cost
	// (for passphrases people chose) instead of pbkdf2-sha256.
	Argon2 *Argon2Params
	// Token, when set, is stored as token 0 bound to keyslot 0.
	Token *KMSToken
	// Label is the header label (at most 47 bytes).
	Label string
	// HeaderSize is the size of one header copy, binary header and JSON
	// area: a power of two from 16 KiB to 4 MiB that leaves room for the
	// keyslot area before DefaultDataOffset (0: 16 KiB, cryptsetup's
	// default). The keyslot area starts right after both copies.
	HeaderSize uint64
}

// Format writes a new LUKS2 header (both copies, keyslot 0, digest 0, one
// crypt segment at DefaultDataOffset with size "dynamic") at the start of f
// and sizes f, sparse, to DefaultDataOffset + dataSize bytes. dataSize must
// be a positive multiple of the sector size. f is synced before return.
func Format(f Image, dataSize int64, opts FormatOptions) (*Header, error) {
	if opts.SectorSize != 512 && opts.SectorSize != 4096 {
		return nil, fmt.Errorf("crypt: sector size %d (512 or 4096)", opts.SectorSize)
	}
	if len(opts.VolumeKey) != 32 && len(opts.VolumeKey) != 64 {
		return nil, fmt.Errorf("crypt: volume key of %d bytes (32 or 64)", len(opts.VolumeKey))
	}
	if len(opts.Passphrase) == 0 {
		return nil, errors.New("crypt: empty passphrase")
	}
	if dataSize <= 0 || dataSize%int64(opts.SectorSize) != 0 {
		return nil, fmt.Errorf("crypt: data size %d is not a positive multiple of the sector size %d", dataSize, opts.SectorSize)
	}
	hdrSize := opts.HeaderSize
	if hdrSize == 0 {
		hdrSize = defaultHdrSize
	}
	if !validHdrSize(hdrSize) || 2*hdrSize+(1<<20) > DefaultDataOffset {
		return nil, fmt.Errorf("crypt: header size %d: want a power of two from 16 KiB to 4 MiB", hdrSize)
	}
	keyslotsOffset := 2 * hdrSize
	if len(opts.Label) >= lenLabel {
		return nil, fmt.Errorf("crypt: label longer than %d bytes", lenLabel-1)
	}
	// Validates the key (equal halves are refused for XTS).
	vx, err := NewXTS(opts.VolumeKey, opts.SectorSize)
	if err != nil {
		return nil, err
	}
	vx.Wipe()
	iters := opts.PBKDF2Iterations
	if iters <= 0 {
		iters = DefaultPBKDF2Iterations
	}
	keySize := len(opts.VolumeKey)

	// Keyslot 0: KDF(passphrase) encrypts the AF-split volume key.
	kdfSalt, err := randomBytes(32)
	if err != nil {
		return nil, err
	}
	kdf := jsonKDF{Type: "pbkdf2", Hash: "sha256", Iterations: iters, Salt: kdfSalt}
	if a := opts.Argon2; a != nil {
		if err := a.check(); err != nil {
			return nil, err
		}
		kdf = jsonKDF{Type: "argon2id", Time: a.Time, Memory: a.MemoryKiB, CPUs: a.Threads, Salt: kdfSalt}
	}
	areaKey, err := deriveKeyslotKey(&kdf, opts.Passphrase, keySize)
	if err != nil {
		return nil, err
	}
	defer clear(areaKey)
	split, err := afSplit(opts.VolumeKey, afStripes, sha256.New)
	if err != nil {
		return nil, err
	}
	defer clear(split)
	area := make([]byte, afSectors(keySize, afStripes)*512)
	copy(area, split)
	c, err := keyslotCipher("aes-xts-plain64", areaKey)
	if err != nil {
		return nil, err
	}
	c.EncryptSectors(area, area, 0)
	c.Wipe()
	areaSize := (uint64(len(area)) + 4095) &^ 4095

	digestSalt, err := randomBytes(32)
	if err != nil {
		return nil, err
	}
	digest := pbkdf2Key(opts.VolumeKey, digestSalt, iters, 32, sha256.New)

	meta := map[string]any{
		"keyslots": map[string]any{"0": &jsonKeyslot{
			Type:    "luks2",
			KeySize: keySize,
			AF:      jsonAF{Type: "luks1", Stripes: afStripes, Hash: "sha256"},
			Area: jsonArea{Type: "raw", Offset: u64String(keyslotsOffset), Size: u64String(areaSize),
				Encryption: "aes-xts-plain64", KeySize: keySize},
			KDF: kdf,
		}},
		"tokens": map[string]any{},
		"segments": map[string]any{"0": &jsonSegment{
			Type: "crypt", Offset: DefaultDataOffset, Size: "dynamic", IVTweak: "0",
			Encryption: "aes-xts-plain64", SectorSize: opts.SectorSize,
		}},
		"digests": map[string]any{"0": &jsonDigest{
			Type: "pbkdf2", Keyslots: []string{"0"}, Segments: []string{"0"},
			Hash: "sha256", Iterations: iters, Salt: digestSalt, Digest: digest,
		}},
		"config": &jsonConfig{
			JSONSize:     u64String(hdrSize - binHeaderSize),
			KeyslotsSize: u64String(DefaultDataOffset - keyslotsOffset),
		},
	}
	if opts.Token != nil {
		tok, err := opts.Token.marshal([]string{"0"})
		if err != nil {
			return nil, err
		}
		meta["tokens"] = map[string]json.RawMessage{"0": tok}
	}
	jsonText, err := json.Marshal(meta)
	if err != nil {
		return nil, fmt.Errorf("crypt: encode LUKS2 metadata: %w", err)
	}
	uuid, err := newUUID()
	if err != nil {
		return nil, err
	}
	hdr := headerFields{hdrSize: hdrSize, seqID: 1, label: opts.Label, uuid: uuid, csumAlg: "sha256"}

	if err := f.Truncate(0); err != nil {
		return nil, fmt.Errorf("crypt: truncate image: %w", err)
	}
	if err := f.Truncate(DefaultDataOffset + dataSize); err != nil {
		return nil, fmt.Errorf("crypt: size image: %w", err)
	}
	if _, err := f.WriteAt(area, int64(keyslotsOffset)); err != nil {
		return nil, fmt.Errorf("crypt: write keyslot area: %w", err)
	}
	if err := writeHeaderCopies(f, hdr, jsonText); err != nil {
		return nil, err
	}
	if err := f.Sync(); err != nil {
		return nil, fmt.Errorf("crypt: sync image: %w", err)
	}
	return ReadHeader(f)
}

// headerFields are the binary header's variable fields.
type headerFields struct {
	hdrSize   uint64
	seqID     uint64
	label     string
	subsystem string
	uuid      string
	csumAlg   string
}

// encodeCopy builds one header copy (binary header + JSON area) with its
// checksum.
func encodeCopy(hf headerFields, jsonText []byte, primary bool, salt []byte) ([]byte, error) {
	if uint64(len(jsonText)) >= hf.hdrSize-binHeaderSize {
		return nil, fmt.Errorf("crypt: LUKS2 metadata of %d bytes does not fit its %d-byte JSON area", len(jsonText), hf.hdrSize-binHeaderSize)
	}
	buf := make([]byte, hf.hdrSize)
	off := uint64(0)
	if primary {
		copy(buf[offMagic:], magicPrimary)
	} else {
		copy(buf[offMagic:], magicSecondary)
		off = hf.hdrSize
	}
	binary.BigEndian.PutUint16(buf[offVersion:], 2)
	binary.BigEndian.PutUint64(buf[offHdrSize:], hf.hdrSize)
	binary.BigEndian.PutUint64(buf[offSeqID:], hf.seqID)
	copy(buf[offLabel:offLabel+lenLabel-1], hf.label)
	copy(buf[offCsumAlg:offCsumAlg+lenCsumAlg-1], hf.csumAlg)
	copy(buf[offSalt:offSalt+lenSalt], salt)
	copy(buf[offUUID:offUUID+lenUUID-1], hf.uuid)
	copy(buf[offSubsystem:offSubsystem+47], hf.subsystem)
	binary.BigEndian.PutUint64(buf[offHdrOffset:], off)
	copy(buf[binHeaderSize:], jsonText)
	h, err := hashByName(hf.csumAlg)
	if err != nil {
		return nil, err
	}
	sum := headerChecksum(h, buf[:binHeaderSize], buf[binHeaderSize:])
	copy(buf[offCsum:offCsum+lenCsum], sum)
	return buf, nil
}

// writeHeaderCopies writes the secondary copy, syncs, then the primary, so
// that a crash in between leaves one valid copy (the reader falls back to
// it, or picks the higher sequence id).
func writeHeaderCopies(f Image, hf headerFields, jsonText []byte) error {
	for _, primary := range []bool{false, true} {
		salt, err := randomBytes(lenSalt)
		if err != nil {
			return err
		}
		buf, err := encodeCopy(hf, jsonText, primary, salt)
		if err != nil {
			return err
		}
		off := int64(0)
		if !primary {
			off = int64(hf.hdrSize)
		}
		if _, err := f.WriteAt(buf, off); err != nil {
			return fmt.Errorf("crypt: write header copy at %d: %w", off, err)
		}
		if err := f.Sync(); err != nil {
			return fmt.Errorf("crypt: sync header copy: %w", err)
		}
	}
	return nil
}

func randomBytes(n int) ([]byte, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return nil, fmt.Errorf("crypt: random: %w", err)
	}
	return b, nil
}

// newUUID returns a random (version 4) UUID string.
func newUUID() (string, error) {
	b, err := randomBytes(16)
	if err != nil {
		return "", err
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16]), nil
}
