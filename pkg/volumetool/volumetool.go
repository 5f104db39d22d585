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
	"strconv"
	"strings"

	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
)

// ParseSize parses a byte count with an optional suffix: K, M, G, T (powers
// of 1024, as are Ki, Mi, Gi, Ti) or KB, MB, GB, TB (powers of 1000).
func ParseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		mult   int64
	}{
		{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40},
		{"Ki", 1 << 10}, {"Mi", 1 << 20}, {"Gi", 1 << 30}, {"Ti", 1 << 40},
		{"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12},
		{"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"T", 1 << 40},
	} {
		if strings.HasSuffix(t, u.suffix) {
			t, mult = strings.TrimSuffix(t, u.suffix), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n <= 0 || n > (1<<50)/mult {
		return 0, fmt.Errorf("size %q: want a positive number of bytes, optionally with K, M, G, T or Ki, Mi, Gi, Ti", s)
	}
	return n * mult, nil
}

// Format makes a new LUKS2 image at path holding size usable bytes after the
// header, with a random volume key in keyslot 0 under the key file's bytes.
// It refuses to touch an existing file and removes a half-made one.
func Format(path string, size int64, keyFile string, sectorSize int) (err error) {
	if sectorSize != 512 && sectorSize != 4096 {
		return fmt.Errorf("--sector-size %d: want 512 or 4096", sectorSize)
	}
	if size%int64(sectorSize) != 0 {
		return fmt.Errorf("--size %d is not a multiple of the sector size %d", size, sectorSize)
	}
	pass, err := crypt.ReadKeyFile(keyFile)
	if err != nil {
		return err
	}
	defer clear(pass)
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
	if _, err := crypt.Format(f, size, crypt.FormatOptions{SectorSize: sectorSize, VolumeKey: vk, Passphrase: pass}); err != nil {
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
