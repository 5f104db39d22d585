// Package volumetool implements the offline image commands of csi-encdisk
// ("volume format" and "volume inspect"): LUKS2 images handled outside
// Kubernetes, for recovery and inspection.
package volumetool

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
)

// FormatOptions say how Format makes an image.
type FormatOptions struct {
	SectorSize int // 512 or 4096
	// Argon2 is the cost of an argon2id keyslot (for a passphrase a person
	// chose); nil with KeyIsRandom for the fast pbkdf2 keyslot.
	Argon2 *crypt.Argon2Params
	// KeyIsRandom: the key file holds at least 32 bytes from a CSPRNG; the
	// keyslot is pbkdf2-sha256 at crypt.DefaultPBKDF2Iterations (stretching
	// cannot make such a key easier or harder to guess). Shorter key files
	// are refused with it.
	KeyIsRandom bool
}

// Format makes a new LUKS2 image at path holding size usable bytes after the
// header, with a random volume key in keyslot 0 under the key file's bytes.
// It refuses to touch an existing file and removes a half-made one.
func Format(path string, size int64, keyFile string, o FormatOptions) (err error) {
	sectorSize := o.SectorSize
	if sectorSize != 512 && sectorSize != 4096 {
		return fmt.Errorf("--sector-size %d: want 512 or 4096", sectorSize)
	}
	if size <= 0 || size%int64(sectorSize) != 0 {
		return fmt.Errorf("--size %d is not a positive multiple of the sector size %d", size, sectorSize)
	}
	if (o.Argon2 == nil) != o.KeyIsRandom {
		return errors.New("give an argon2id cost, or say that the key is random (not both)")
	}
	pass, err := crypt.ReadKeyFile(keyFile)
	if err != nil {
		return err
	}
	defer clear(pass)
	if o.KeyIsRandom && len(pass) < 32 {
		return fmt.Errorf("--key-is-random: the key file holds %d bytes; a random key needs at least 32 (256 bits)", len(pass))
	}
	vk := make([]byte, 64)
	defer clear(vk)
	if _, err := rand.Read(vk); err != nil {
		return fmt.Errorf("random volume key: %w", err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		if errors.Is(err, os.ErrExist) {
			return fmt.Errorf("%s exists: refusing to overwrite it", path)
		}
		return fmt.Errorf("create image: %w", err)
	}
	defer func() {
		cerr := f.Close()
		if err == nil && cerr != nil {
			err = fmt.Errorf("close image: %w", cerr)
		}
		if err != nil {
			os.Remove(path)
		}
	}()
	if _, err := crypt.Format(f, size, crypt.FormatOptions{SectorSize: sectorSize, VolumeKey: vk, Passphrase: pass, Argon2: o.Argon2}); err != nil {
		return fmt.Errorf("format %s: %w", path, err)
	}
	return nil
}

// Inspect writes the LUKS2 header of the image at path to w: as JSON when
// asJSON, else as text. It never shows key material; the wrapped passphrase
// of a KMS token opens only through the KMS and is shortened in text form.
func Inspect(path string, asJSON bool, w io.Writer) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open image: %w", err)
	}
	defer f.Close()
	h, err := crypt.ReadHeader(f)
	if err != nil {
		if errors.Is(err, crypt.ErrNotLUKS2) {
			return fmt.Errorf("%s is not a LUKS2 image (an unencrypted volume is a raw image)", path)
		}
		return fmt.Errorf("%s: %w", path, err)
	}
	d := h.Describe()
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(d)
	}
	fmt.Fprintf(w, "LUKS2 image %s\n", path)
	fmt.Fprintf(w, "  uuid:        %s\n  label:       %s\n  seqid:       %d\n  header size: %d bytes (x2 copies)\n", d.UUID, orNone(d.Label), d.SeqID, d.HeaderSize)
	if d.DamagedCopy != "" {
		fmt.Fprintf(w, "  WARNING:     the %s header copy is damaged; the other one is in use\n", d.DamagedCopy)
	}
	fmt.Fprintln(w, "Segments:")
	for _, s := range d.Segments {
		fmt.Fprintf(w, "  %s: %s, offset %d, size %s, cipher %s, sector %d\n", s.ID, s.Type, s.Offset, s.Size, s.Cipher, s.SectorSize)
	}
	fmt.Fprintln(w, "Keyslots:")
	for _, k := range d.Keyslots {
		kdf := k.KDF
		if k.KDF == "pbkdf2" {
			kdf = fmt.Sprintf("pbkdf2-%s, %d iterations", k.KDFHash, k.Iterations)
		} else if k.Time > 0 {
			kdf = fmt.Sprintf("%s, time %d, memory %d KiB, %d threads", k.KDF, k.Time, k.MemoryKiB, k.CPUs)
		}
		fmt.Fprintf(w, "  %s: %s, %d-bit key, area %s at %d (+%d), AF %d stripes %s, %s\n", k.ID, k.Type, k.KeySize*8, k.Cipher, k.AreaOffset, k.AreaSize, k.AFStripes, k.AFHash, kdf)
	}
	fmt.Fprintln(w, "Digests:")
	for _, g := range d.Digests {
		fmt.Fprintf(w, "  %s: %s-%s, %d iterations, keyslots %v, segments %v\n", g.ID, g.Type, g.Hash, g.Iterations, g.Keyslots, g.Segments)
	}
	fmt.Fprintln(w, "Tokens:")
	if tok, ok := h.KMSToken(); ok {
		ct := base64.StdEncoding.EncodeToString(tok.Ciphertext)
		if len(ct) > 24 {
			ct = ct[:24] + "..."
		}
		fmt.Fprintf(w, "  %s: kms_id %s, key_id %s, wrapped passphrase %s (%d bytes), %d annotations\n", crypt.KMSTokenType, tok.KMSID, tok.KeyID, ct, len(tok.Ciphertext), len(tok.Annotations))
	}
	for id, raw := range d.Tokens {
		var t struct {
			Type string `json:"type"`
		}
		_ = json.Unmarshal(raw, &t)
		if t.Type != crypt.KMSTokenType {
			fmt.Fprintf(w, "  %s: %s\n", id, t.Type)
		}
	}
	if len(d.Tokens) == 0 {
		fmt.Fprintln(w, "  (none)")
	}
	return nil
}

func orNone(s string) string {
	if s == "" {
		return "(none)"
	}
	return s
}
