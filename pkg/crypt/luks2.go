package crypt

import (
	"bytes"
	"crypto/subtle"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"sort"
	"strconv"
)

// LUKS2 on-disk constants (LUKS2 On-Disk Format Specification).
const (
	// DefaultDataOffset is where the data segment of images we format
	// starts: 16 MiB, as cryptsetup luksFormat places it.
	DefaultDataOffset = 16 << 20

	binHeaderSize  = 4096
	defaultHdrSize = 16384 // binary header + JSON area of one copy
	maxHdrSize     = 4 << 20
	maxKeyslots    = 32
	maxTokens      = 32
	maxKeySize     = 128 // bytes; aes-xts-plain64 uses 32 or 64
	maxStripes     = 4000
)

var (
	magicPrimary   = []byte("LUKS\xba\xbe")
	magicSecondary = []byte("SKUL\xba\xbe")

	// validHdrSizes are the sizes a LUKS2 header copy may have; the
	// secondary copy sits at one of these offsets.
	validHdrSizes = []uint64{16384, 32768, 65536, 131072, 262144, 524288, 1048576, 2097152, 4194304}
)

// ErrNotLUKS2 means the data has no LUKS2 header at all (no magic).
var ErrNotLUKS2 = errors.New("crypt: not a LUKS2 image")

// ErrWrongPassphrase means no keyslot opens with the given passphrase.
var ErrWrongPassphrase = errors.New("crypt: no keyslot opens with this passphrase")

// Offsets of the fields of the binary header.
const (
	offMagic     = 0
	offVersion   = 6
	offHdrSize   = 8
	offSeqID     = 16
	offLabel     = 24
	offCsumAlg   = 72
	offSalt      = 104
	offUUID      = 168
	offSubsystem = 208
	offHdrOffset = 256
	offCsum      = 448
	lenLabel     = 48
	lenCsumAlg   = 32
	lenSalt      = 64
	lenUUID      = 40
	lenCsum      = 64
)

// u64String is a JSON string holding a decimal uint64, as LUKS2 stores
// offsets and sizes.
type u64String uint64

func (u *u64String) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("want a decimal string: %w", err)
	}
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return fmt.Errorf("bad number %q", s)
	}
	*u = u64String(v)
	return nil
}

func (u u64String) MarshalJSON() ([]byte, error) {
	return json.Marshal(strconv.FormatUint(uint64(u), 10))
}

type jsonMetadata struct {
	Keyslots map[string]*jsonKeyslot    `json:"keyslots"`
	Tokens   map[string]json.RawMessage `json:"tokens"`
	Segments map[string]*jsonSegment    `json:"segments"`
	Digests  map[string]*jsonDigest     `json:"digests"`
	Config   jsonConfig                 `json:"config"`
}

type jsonKeyslot struct {
	Type     string   `json:"type"`
	KeySize  int      `json:"key_size"`
	AF       jsonAF   `json:"af"`
	Area     jsonArea `json:"area"`
	KDF      jsonKDF  `json:"kdf"`
	Priority *int     `json:"priority,omitempty"`
}

type jsonAF struct {
	Type    string `json:"type"`
	Stripes int    `json:"stripes"`
	Hash    string `json:"hash"`
}

type jsonArea struct {
	Type       string    `json:"type"`
	Offset     u64String `json:"offset"`
	Size       u64String `json:"size"`
	Encryption string    `json:"encryption"`
	KeySize    int       `json:"key_size"`
}

type jsonKDF struct {
	Type       string `json:"type"`
	Hash       string `json:"hash,omitempty"`
	Iterations int    `json:"iterations,omitempty"`
	Time       int    `json:"time,omitempty"`
	Memory     int    `json:"memory,omitempty"`
	CPUs       int    `json:"cpus,omitempty"`
	Salt       []byte `json:"salt"`
}

type jsonSegment struct {
	Type       string    `json:"type"`
	Offset     u64String `json:"offset"`
	Size       string    `json:"size"`
	IVTweak    string    `json:"iv_tweak"`
	Encryption string    `json:"encryption"`
	SectorSize int       `json:"sector_size"`
	Flags      []string  `json:"flags,omitempty"`
	Integrity  any       `json:"integrity,omitempty"`
}

type jsonDigest struct {
	Type       string   `json:"type"`
	Keyslots   []string `json:"keyslots"`
	Segments   []string `json:"segments"`
	Hash       string   `json:"hash"`
	Iterations int      `json:"iterations"`
	Salt       []byte   `json:"salt"`
	Digest     []byte   `json:"digest"`
}

type jsonConfig struct {
	JSONSize     u64String `json:"json_size"`
	KeyslotsSize u64String `json:"keyslots_size"`
	Flags        []string  `json:"flags,omitempty"`
	Requirements any       `json:"requirements,omitempty"`
}

// Header is a verified LUKS2 header. It keeps the reader it was read from,
// which must stay readable while Unlock is used.
type Header struct {
	r         io.ReaderAt
	hdrSize   uint64
	seqID     uint64
	label     string
	subsystem string
	uuid      string
	csumAlg   string
	// raw is the JSON object of the copy in use, kept whole so that a
	// rewrite (token update) preserves what we do not interpret.
	raw     map[string]json.RawMessage
	meta    jsonMetadata
	damaged string // "primary" or "secondary" when one copy was unusable

	segment    *jsonSegment
	segDigest  string // id of the digest bound to segment 0
	dataOffset int64
}

// DataOffset returns the byte offset of the data segment in the image.
func (h *Header) DataOffset() int64 { return h.dataOffset }

// SectorSize returns the encryption sector size of the data segment.
func (h *Header) SectorSize() int { return h.segment.SectorSize }

// Cipher returns the data segment's cipher spec, e.g. "aes-xts-plain64".
func (h *Header) Cipher() string { return h.segment.Encryption }

// KeySize returns the volume key size in bytes.
func (h *Header) KeySize() int {
	for _, id := range h.meta.Digests[h.segDigest].Keyslots {
		if ks, ok := h.meta.Keyslots[id]; ok {
			return ks.KeySize
		}
	}
	return 0
}

// UUID returns the header's UUID.
func (h *Header) UUID() string { return h.uuid }

// SeqID returns the header's sequence id (bumped on every metadata update).
func (h *Header) SeqID() uint64 { return h.seqID }

// HeaderSize returns the size of one header copy (binary header + JSON area).
func (h *Header) HeaderSize() uint64 { return h.hdrSize }

// Damaged names the header copy that failed verification ("primary" or
// "secondary"), or "" when both are good.
func (h *Header) Damaged() string { return h.damaged }

// readCopy reads and verifies one header copy at off. It returns errNoMagic
// when the magic is absent.
func readCopy(r io.ReaderAt, off uint64, primary bool) (*Header, error) {
	bin := make([]byte, binHeaderSize)
	if _, err := r.ReadAt(bin, int64(off)); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, errNoMagic // nothing there: no header copy at off
		}
		return nil, fmt.Errorf("read binary header at %d: %w", off, err)
	}
	magic := magicPrimary
	if !primary {
		magic = magicSecondary
	}
	if !bytes.Equal(bin[offMagic:offMagic+6], magic) {
		return nil, errNoMagic
	}
	if v := binary.BigEndian.Uint16(bin[offVersion:]); v != 2 {
		return nil, fmt.Errorf("LUKS version %d, want 2", v)
	}
	hdrSize := binary.BigEndian.Uint64(bin[offHdrSize:])
	if !validHdrSize(hdrSize) {
		return nil, fmt.Errorf("header size %d is not a LUKS2 header size", hdrSize)
	}
	if got := binary.BigEndian.Uint64(bin[offHdrOffset:]); got != off {
		return nil, fmt.Errorf("header offset field %d, found at %d", got, off)
	}
	csumAlg := cString(bin[offCsumAlg : offCsumAlg+lenCsumAlg])
	hf, err := hashByName(csumAlg)
	if err != nil {
		return nil, fmt.Errorf("checksum algorithm: %w", err)
	}
	area := make([]byte, hdrSize-binHeaderSize)
	if _, err := r.ReadAt(area, int64(off+binHeaderSize)); err != nil {
		return nil, fmt.Errorf("read JSON area at %d: %w", off+binHeaderSize, err)
	}
	sum := headerChecksum(hf, bin, area)
	if subtle.ConstantTimeCompare(sum, bin[offCsum:offCsum+len(sum)]) != 1 {
		return nil, errors.New("header checksum mismatch")
	}
	jsonText := area
	if i := bytes.IndexByte(area, 0); i >= 0 {
		jsonText = area[:i]
	}
	h := &Header{
		r:         r,
		hdrSize:   hdrSize,
		seqID:     binary.BigEndian.Uint64(bin[offSeqID:]),
		label:     cString(bin[offLabel : offLabel+lenLabel]),
		subsystem: cString(bin[offSubsystem : offSubsystem+48]),
		uuid:      cString(bin[offUUID : offUUID+lenUUID]),
		csumAlg:   csumAlg,
	}
	if err := json.Unmarshal(jsonText, &h.raw); err != nil {
		return nil, fmt.Errorf("JSON area: %w", err)
	}
	if err := json.Unmarshal(jsonText, &h.meta); err != nil {
		return nil, fmt.Errorf("JSON metadata: %w", err)
	}
	if err := h.validate(); err != nil {
		return nil, fmt.Errorf("JSON metadata: %w", err)
	}
	return h, nil
}

var errNoMagic = errors.New("no LUKS2 magic")

// headerChecksum computes the checksum of a header copy with its checksum
// field taken as zeros.
func headerChecksum(hf func() hash.Hash, bin, area []byte) []byte {
	h := hf()
	var zero [lenCsum]byte
	h.Write(bin[:offCsum])
	h.Write(zero[:])
	h.Write(bin[offCsum+lenCsum:])
	h.Write(area)
	return h.Sum(nil)
}

func validHdrSize(s uint64) bool {
	for _, v := range validHdrSizes {
		if s == v {
			return true
		}
	}
	return false
}

// cString returns the NUL-terminated string at the start of b.
func cString(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

// ReadHeader reads a LUKS2 header from r and verifies both copies. When one
// copy is damaged it uses the other (Damaged says which); when both are
// valid but differ, the one with the higher sequence id wins, as cryptsetup
// decides. Anything inconsistent is an error; data without LUKS2 magic gives
// ErrNotLUKS2.
func ReadHeader(r io.ReaderAt) (*Header, error) {
	primary, perr := readCopy(r, 0, true)
	var secondary *Header
	var serr error = errNoMagic
	if perr == nil {
		secondary, serr = readCopy(r, primary.hdrSize, false)
	} else {
		// The primary does not say where the secondary is: try every
		// offset a secondary copy may have.
		for _, off := range validHdrSizes {
			s, err := readCopy(r, off, false)
			if err == nil {
				secondary, serr = s, nil
				break
			}
			if !errors.Is(err, errNoMagic) && errors.Is(serr, errNoMagic) {
				serr = err
			}
		}
	}
	switch {
	case perr == nil && serr == nil:
		if secondary.seqID > primary.seqID {
			secondary.damaged = "primary"
			return secondary, nil
		}
		if secondary.seqID < primary.seqID {
			primary.damaged = "secondary"
		}
		return primary, nil
	case perr == nil:
		primary.damaged = "secondary"
		return primary, nil
	case serr == nil:
		secondary.damaged = "primary"
		return secondary, nil
	case errors.Is(perr, errNoMagic) && errors.Is(serr, errNoMagic):
		return nil, ErrNotLUKS2
	default:
		return nil, fmt.Errorf("crypt: both LUKS2 header copies are unusable: primary: %v; secondary: %v", perr, serr)
	}
}

// Bounds on key-derivation costs, so that a crafted header cannot make
// Unlock run for hours or allocate without limit: 4 GiB of argon2 memory is
// the LUKS2 limit; the time and iteration caps are far above what cryptsetup
// benchmarks to on any current CPU.
const (
	maxArgonMemoryKiB   = 4 << 20
	maxArgonTime        = 1000
	maxPBKDF2Iterations = 100_000_000
)

func checkID(id string) error {
	n, err := strconv.Atoi(id)
	if err != nil || n < 0 || n >= maxKeyslots || strconv.Itoa(n) != id {
		return fmt.Errorf("%q is not a number below %d", id, maxKeyslots)
	}
	return nil
}

// afSectors is the number of 512-byte sectors an AF-split key occupies.
func afSectors(keySize, stripes int) uint64 {
	return (uint64(keySize)*uint64(stripes) + 511) / 512
}

// sortedIDs returns the keys of m in numeric order.
func sortedIDs[V any](m map[string]V) []string {
	ids := make([]string, 0, len(m))
	for id := range m {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool {
		a, _ := strconv.Atoi(ids[i])
		b, _ := strconv.Atoi(ids[j])
		return a < b
	})
	return ids
}
