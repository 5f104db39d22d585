package crypt

import "encoding/json"

// Description is a LUKS2 header as shown to people: layout, keyslot and
// digest parameters and tokens, without salts, digests or key material.
type Description struct {
	UUID        string                     `json:"uuid"`
	Label       string                     `json:"label,omitempty"`
	Subsystem   string                     `json:"subsystem,omitempty"`
	SeqID       uint64                     `json:"seqid"`
	HeaderSize  uint64                     `json:"header_size"`
	DamagedCopy string                     `json:"damaged_copy,omitempty"`
	Segments    []SegmentInfo              `json:"segments"`
	Keyslots    []KeyslotInfo              `json:"keyslots"`
	Digests     []DigestInfo               `json:"digests"`
	Tokens      map[string]json.RawMessage `json:"tokens"`
}

// SegmentInfo describes a data segment.
type SegmentInfo struct {
	ID         string `json:"id"`
	Type       string `json:"type"`
	Offset     uint64 `json:"offset"`
	Size       string `json:"size"`
	Cipher     string `json:"cipher"`
	SectorSize int    `json:"sector_size"`
}

// KeyslotInfo describes a keyslot without its key material or salt.
type KeyslotInfo struct {
	ID         string `json:"id"`
	Type       string `json:"type"`
	KeySize    int    `json:"key_size"`
	Cipher     string `json:"area_cipher"`
	AreaOffset uint64 `json:"area_offset"`
	AreaSize   uint64 `json:"area_size"`
	AFStripes  int    `json:"af_stripes"`
	AFHash     string `json:"af_hash"`
	KDF        string `json:"kdf"`
	KDFHash    string `json:"kdf_hash,omitempty"`
	Iterations int    `json:"iterations,omitempty"`
	Time       int    `json:"time,omitempty"`
	MemoryKiB  int    `json:"memory_kib,omitempty"`
	CPUs       int    `json:"cpus,omitempty"`
}

// DigestInfo describes a digest without its salt and value.
type DigestInfo struct {
	ID         string   `json:"id"`
	Type       string   `json:"type"`
	Hash       string   `json:"hash"`
	Iterations int      `json:"iterations"`
	Keyslots   []string `json:"keyslots"`
	Segments   []string `json:"segments"`
}

// Describe returns the header's public description.
func (h *Header) Describe() *Description {
	d := &Description{
		UUID: h.uuid, Label: h.label, Subsystem: h.subsystem, SeqID: h.seqID,
		HeaderSize: h.hdrSize, DamagedCopy: h.damaged, Tokens: h.Tokens(),
	}
	for _, id := range sortedIDs(h.meta.Segments) {
		s := h.meta.Segments[id]
		if s == nil {
			continue
		}
		d.Segments = append(d.Segments, SegmentInfo{ID: id, Type: s.Type, Offset: uint64(s.Offset), Size: s.Size, Cipher: s.Encryption, SectorSize: s.SectorSize})
	}
	for _, id := range sortedIDs(h.meta.Keyslots) {
		k := h.meta.Keyslots[id]
		d.Keyslots = append(d.Keyslots, KeyslotInfo{
			ID: id, Type: k.Type, KeySize: k.KeySize, Cipher: k.Area.Encryption,
			AreaOffset: uint64(k.Area.Offset), AreaSize: uint64(k.Area.Size),
			AFStripes: k.AF.Stripes, AFHash: k.AF.Hash,
			KDF: k.KDF.Type, KDFHash: k.KDF.Hash, Iterations: k.KDF.Iterations,
			Time: k.KDF.Time, MemoryKiB: k.KDF.Memory, CPUs: k.KDF.CPUs,
		})
	}
	for _, id := range sortedIDs(h.meta.Digests) {
		g := h.meta.Digests[id]
		d.Digests = append(d.Digests, DigestInfo{ID: id, Type: g.Type, Hash: g.Hash, Iterations: g.Iterations, Keyslots: g.Keyslots, Segments: g.Segments})
	}
	return d
}
