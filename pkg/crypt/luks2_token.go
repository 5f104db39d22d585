package crypt

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"

	"golang.org/x/sys/unix"
)

// KMSTokenType is the LUKS2 token type that holds a volume's KMS-wrapped
// passphrase.
const KMSTokenType = "csi-encdisk-kms"

// KMSToken is the csi-encdisk-kms LUKS2 token: the keyslot passphrase as the
// KMS plugin wrapped it, and what Decrypt needs besides (KMS v2 key_id and
// annotations). It holds no secret: the ciphertext opens only through the KMS.
type KMSToken struct {
	KMSID       string
	KeyID       string
	Ciphertext  []byte
	Annotations map[string][]byte
}

type jsonKMSToken struct {
	Type        string            `json:"type"`
	Keyslots    []string          `json:"keyslots"`
	KMSID       string            `json:"kms_id"`
	KeyID       string            `json:"key_id"`
	Ciphertext  []byte            `json:"ciphertext"`
	Annotations map[string][]byte `json:"annotations"`
}

func (t *KMSToken) marshal(keyslots []string) ([]byte, error) {
	if len(t.Ciphertext) == 0 {
		return nil, errors.New("crypt: KMS token without ciphertext")
	}
	ann := t.Annotations
	if ann == nil {
		ann = map[string][]byte{}
	}
	b, err := json.Marshal(jsonKMSToken{Type: KMSTokenType, Keyslots: keyslots, KMSID: t.KMSID, KeyID: t.KeyID, Ciphertext: t.Ciphertext, Annotations: ann})
	if err != nil {
		return nil, fmt.Errorf("crypt: encode KMS token: %w", err)
	}
	return b, nil
}

// KMSToken returns the header's csi-encdisk-kms token, if it has one.
func (h *Header) KMSToken() (*KMSToken, bool) {
	for _, id := range sortedIDs(h.meta.Tokens) {
		var t jsonKMSToken
		if err := json.Unmarshal(h.meta.Tokens[id], &t); err != nil || t.Type != KMSTokenType {
			continue
		}
		return &KMSToken{KMSID: t.KMSID, KeyID: t.KeyID, Ciphertext: t.Ciphertext, Annotations: t.Annotations}, true
	}
	return nil, false
}

// Tokens returns every token's JSON by id (for inspection).
func (h *Header) Tokens() map[string]json.RawMessage {
	out := make(map[string]json.RawMessage, len(h.meta.Tokens))
	for id, raw := range h.meta.Tokens {
		out[id] = append(json.RawMessage(nil), raw...)
	}
	return out
}

// ErrTokenChanged is returned by ReplaceKMSToken when the header's token is
// no longer the one the caller read (another process re-wrapped it).
var ErrTokenChanged = errors.New("crypt: the KMS token changed meanwhile")

// headerLockLen is the byte range that header updaters lock: both copies
// of the largest LUKS2 header (2 x 4 MiB).
const headerLockLen = 2 * (4 << 20)

// lockHeader takes the image's own header lock (HeaderLocker), or an open
// file description (OFD) write lock on the
// header range of a file, waiting for any other holder: every header updater of
// any process (the controller's re-wrap, a node's stage-time re-wrap)
// serialises on it. The lock belongs to f's open file description and goes
// with its last close, or with the returned unlock.
func lockHeader(img Image) (func(), error) {
	if l, ok := img.(HeaderLocker); ok {
		return l.LockHeader()
	}
	f, ok := img.(interface{ Fd() uintptr })
	if !ok {
		return nil, errors.New("crypt: the image offers no header lock")
	}
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: io.SeekStart, Start: 0, Len: headerLockLen}
	for {
		err := unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLKW, &lk)
		if err == nil {
			break
		}
		if !errors.Is(err, unix.EINTR) {
			return nil, fmt.Errorf("crypt: lock the LUKS2 header: %w", err)
		}
	}
	return func() {
		un := unix.Flock_t{Type: unix.F_UNLCK, Whence: io.SeekStart, Start: 0, Len: headerLockLen}
		_ = unix.FcntlFlock(f.Fd(), unix.F_OFD_SETLK, &un)
	}, nil
}

// SetKMSToken stores t as the image's csi-encdisk-kms token (replacing the
// existing one, else at the lowest free token id), bound to the keyslots of
// the data segment's digest. Both header copies are rewritten with the
// sequence id bumped, the secondary first, so a crash leaves a valid copy.
// It holds an OFD write lock on the header range for the whole
// read-modify-write, so concurrent updaters in any process never interleave.
func SetKMSToken(f Image, t *KMSToken) error {
	return ReplaceKMSToken(f, nil, t)
}

// ReplaceKMSToken is SetKMSToken on the condition that the header's token
// still has old's ciphertext (old nil: unconditionally); otherwise it
// changes nothing and returns ErrTokenChanged.
func ReplaceKMSToken(f Image, old, t *KMSToken) error {
	unlock, err := lockHeader(f)
	if err != nil {
		return err
	}
	defer unlock()
	if old != nil {
		h, err := ReadHeader(f)
		if err != nil {
			return err
		}
		cur, ok := h.KMSToken()
		if !ok || !bytes.Equal(cur.Ciphertext, old.Ciphertext) || cur.KeyID != old.KeyID {
			return ErrTokenChanged
		}
	}
	return setKMSToken(f, t)
}

func setKMSToken(f Image, t *KMSToken) error {
	h, err := ReadHeader(f)
	if err != nil {
		return err
	}
	tok, err := t.marshal(h.meta.Digests[h.segDigest].Keyslots)
	if err != nil {
		return err
	}
	tokens := map[string]json.RawMessage{}
	for id, raw := range h.meta.Tokens {
		tokens[id] = raw
	}
	slot := ""
	for _, id := range sortedIDs(tokens) {
		var head struct {
			Type string `json:"type"`
		}
		if json.Unmarshal(tokens[id], &head) == nil && head.Type == KMSTokenType {
			slot = id
			break
		}
	}
	for i := 0; slot == "" && i < maxTokens; i++ {
		if _, used := tokens[strconv.Itoa(i)]; !used {
			slot = strconv.Itoa(i)
		}
	}
	if slot == "" {
		return errors.New("crypt: no free LUKS2 token slot")
	}
	tokens[slot] = tok
	return h.rewrite(f, "tokens", tokens)
}

// rewrite replaces one top-level member of the JSON metadata and writes both
// header copies with seqid+1.
func (h *Header) rewrite(f Image, member string, value any) error {
	raw := make(map[string]json.RawMessage, len(h.raw))
	for k, v := range h.raw {
		raw[k] = v
	}
	b, err := json.Marshal(value)
	if err != nil {
		return fmt.Errorf("crypt: encode %s: %w", member, err)
	}
	raw[member] = b
	jsonText, err := json.Marshal(raw)
	if err != nil {
		return fmt.Errorf("crypt: encode LUKS2 metadata: %w", err)
	}
	hf := headerFields{hdrSize: h.hdrSize, seqID: h.seqID + 1, label: h.label, subsystem: h.subsystem, uuid: h.uuid, csumAlg: h.csumAlg}
	if err := writeHeaderCopies(f, hf, jsonText); err != nil {
		return err
	}
	// Check what we wrote before reporting success.
	nh, err := ReadHeader(f)
	if err != nil {
		return fmt.Errorf("crypt: header unreadable after update: %w", err)
	}
	if nh.seqID != hf.seqID || nh.damaged != "" {
		return errors.New("crypt: header update did not take on both copies")
	}
	return nil
}

// Wipe crypto-shreds a LUKS2 image: it overwrites both binary headers and
// JSON areas with zeros and the whole keyslot area, up to the data segment,
// with random bytes, in place, then syncs. Without the keyslot, the data
// segment cannot be decrypted by anyone who did not keep the volume key.
func Wipe(f Image) error {
	end := int64(DefaultDataOffset)
	hdrEnd := int64(2 * defaultHdrSize)
	if h, err := ReadHeader(f); err == nil {
		end = h.dataOffset
		hdrEnd = int64(2 * h.hdrSize)
	}
	size, err := imageSize(f)
	if err != nil {
		return fmt.Errorf("crypt: wipe: %w", err)
	}
	end = min(end, size)
	hdrEnd = min(hdrEnd, end)
	buf := make([]byte, 1<<20)
	for off := int64(0); off < end; {
		n := min(int64(len(buf)), end-off)
		chunk := buf[:n]
		if off < hdrEnd {
			n = min(n, hdrEnd-off)
			chunk = buf[:n]
			clear(chunk)
		} else if _, err := io.ReadFull(rand.Reader, chunk); err != nil {
			return fmt.Errorf("crypt: wipe: random: %w", err)
		}
		if _, err := f.WriteAt(chunk, off); err != nil {
			return fmt.Errorf("crypt: wipe at %d: %w", off, err)
		}
		off += n
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("crypt: wipe: sync: %w", err)
	}
	return nil
}
