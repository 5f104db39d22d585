package crypt

import (
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/binary"
	"fmt"
	"hash"
)

// hashByName returns the constructor of a hash named as LUKS2 names them.
func hashByName(name string) (func() hash.Hash, error) {
	switch name {
	case "sha1":
		return sha1.New, nil
	case "sha256":
		return sha256.New, nil
	case "sha512":
		return sha512.New, nil
	}
	return nil, fmt.Errorf("unsupported hash %q (sha1, sha256, sha512)", name)
}

// afDiffuse is the LUKS anti-forensic diffusion: each digest-sized chunk j
// of block is replaced by H(be32(j) || chunk), the last chunk truncated.
func afDiffuse(block []byte, h func() hash.Hash) {
	hh := h()
	ds := hh.Size()
	var iv [4]byte
	var sum []byte
	for j, off := 0, 0; off < len(block); j, off = j+1, off+ds {
		end := min(off+ds, len(block))
		hh.Reset()
		binary.BigEndian.PutUint32(iv[:], uint32(j))
		hh.Write(iv[:])
		hh.Write(block[off:end])
		sum = hh.Sum(sum[:0])
		copy(block[off:end], sum)
	}
}

// afSplit spreads key over stripes blocks (the LUKS1 AF splitter that LUKS2
// keyslots use): stripes-1 random blocks, and a last one that is the key
// XOR the diffused running XOR of the others. Losing any part of the result
// loses the key, which is what makes overwriting a keyslot effective.
func afSplit(key []byte, stripes int, h func() hash.Hash) ([]byte, error) {
	bs := len(key)
	out := make([]byte, bs*stripes)
	if _, err := rand.Read(out[:bs*(stripes-1)]); err != nil {
		return nil, fmt.Errorf("AF split: random: %w", err)
	}
	d := make([]byte, bs)
	defer clear(d)
	for i := 0; i < stripes-1; i++ {
		xorInto(d, out[i*bs:(i+1)*bs])
		afDiffuse(d, h)
	}
	last := out[(stripes-1)*bs:]
	for i := range last {
		last[i] = d[i] ^ key[i]
	}
	return out, nil
}

// afMerge is the inverse of afSplit: it returns the key of size bs.
func afMerge(split []byte, bs, stripes int, h func() hash.Hash) []byte {
	d := make([]byte, bs)
	for i := 0; i < stripes-1; i++ {
		xorInto(d, split[i*bs:(i+1)*bs])
		afDiffuse(d, h)
	}
	xorInto(d, split[(stripes-1)*bs:stripes*bs])
	return d
}

func xorInto(dst, src []byte) {
	for i := range dst {
		dst[i] ^= src[i]
	}
}
