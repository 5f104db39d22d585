package demo

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/csi-encdisk/csi-encdisk/pkg/backend"
	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
)

// scanTree counts the occurrences of needle in every regular file under
// root, reading each file in chunks that overlap by len(needle)-1 bytes. Holes
// read as zeros, so sparse images cost read time but no memory.
func scanTree(ctx context.Context, root string, needle []byte) (hits, files int, err error) {
	err = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if !d.Type().IsRegular() {
			return nil
		}
		n, err := scanFile(ctx, path, needle)
		if err != nil {
			return err
		}
		hits += n
		files++
		return nil
	})
	if err != nil {
		return 0, 0, fmt.Errorf("scan %s: %w", root, err)
	}
	return hits, files, nil
}

func scanFile(ctx context.Context, path string, needle []byte) (int, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	const chunk = 4 << 20
	buf := make([]byte, chunk+len(needle)-1)
	carry, hits := 0, 0
	for {
		if ctx.Err() != nil {
			return 0, ctx.Err()
		}
		n, err := io.ReadFull(f, buf[carry:])
		data := buf[:carry+n]
		hits += bytes.Count(data, needle)
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return hits, nil
		}
		if err != nil {
			return 0, err
		}
		// Keep the tail that could begin a match split across chunks.
		keep := len(needle) - 1
		copy(buf, data[len(data)-keep:])
		carry = keep
	}
}

// countFiles counts regular files under root named name.
func countFiles(root, name string) (int, error) {
	n := 0
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if d.Type().IsRegular() && d.Name() == name {
			n++
		}
		return nil
	})
	return n, err
}

// findImage returns the pool image of volumeID: the image file in the
// directory named after the id.
func findImage(dataDir, volumeID string) (string, error) {
	var found string
	err := filepath.WalkDir(dataDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() && d.Name() == backend.ImageFileName && filepath.Base(filepath.Dir(path)) == volumeID {
			found = path
			return fs.SkipAll
		}
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("find image of %s: %w", volumeID, err)
	}
	if found == "" {
		return "", fmt.Errorf("no image of %s under %s", volumeID, dataDir)
	}
	return found, nil
}

// readHead reads the first n bytes of path (a short file is an error).
func readHead(path string, n int) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	defer f.Close()
	buf := make([]byte, n)
	if _, err := io.ReadFull(f, buf); err != nil {
		return nil, fmt.Errorf("read the header area of %s: %w", path, err)
	}
	return buf, nil
}

// survivingBlocks counts the 16-byte blocks of old that are not all zero and
// still stand at the same offset in cur.
func survivingBlocks(old, cur []byte) (surviving, nonZero int) {
	var zero [16]byte
	for off := 0; off+16 <= len(old) && off+16 <= len(cur); off += 16 {
		b := old[off : off+16]
		if bytes.Equal(b, zero[:]) {
			continue
		}
		nonZero++
		if bytes.Equal(b, cur[off:off+16]) {
			surviving++
		}
	}
	return surviving, nonZero
}

// checkShredded examines the bytes of a deleted volume's image (kept through
// a second hard link): no LUKS2 header must remain, no non-zero 16-byte block
// of the old header and keyslot area may stand where it stood, and cryptsetup
// must not recognise it either.
func checkShredded(ctx context.Context, path string, oldHeader []byte) (string, error) {
	cur, err := readHead(path, len(oldHeader))
	if err != nil {
		return "", err
	}
	surviving, nonZero := survivingBlocks(oldHeader, cur)
	if nonZero == 0 {
		return "", errors.New("the old header area was all zeros: nothing to compare")
	}
	if surviving != 0 {
		return "", fmt.Errorf("%d of %d header/keyslot blocks survived the deletion", surviving, nonZero)
	}

	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("open kept image: %w", err)
	}
	defer f.Close()
	if _, err := crypt.ReadHeader(f); err == nil {
		return "", errors.New("a LUKS2 header is still readable")
	}
	head := make([]byte, 8)
	if _, err := f.ReadAt(head, 0); err != nil {
		return "", fmt.Errorf("read kept image: %w", err)
	}
	if bytes.HasPrefix(head, []byte("LUKS\xba\xbe")) || bytes.HasPrefix(head, []byte("SKUL\xba\xbe")) {
		return "", errors.New("LUKS magic still present")
	}
	if _, err := exec.LookPath("cryptsetup"); err == nil {
		if out, err := exec.CommandContext(ctx, "cryptsetup", "isLuks", path).CombinedOutput(); err == nil {
			return "", fmt.Errorf("cryptsetup still sees LUKS: %s", out)
		}
		return fmt.Sprintf("0 of %d header/keyslot blocks left; cryptsetup isLuks: no", nonZero), nil
	}
	return fmt.Sprintf("0 of %d header/keyslot blocks left", nonZero), nil
}

// runCommand runs binary with args and returns its standard output.
func runCommand(ctx context.Context, binary string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, binary, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("%w: %s", err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

// tokenKeyID returns the key_id of the KMS token in an image's header.
func tokenKeyID(image string) (string, error) {
	f, err := os.Open(image)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h, err := crypt.ReadHeader(f)
	if err != nil {
		return "", fmt.Errorf("header of %s: %w", image, err)
	}
	tok, ok := h.KMSToken()
	if !ok {
		return "", fmt.Errorf("%s has no KMS token", image)
	}
	return tok.KeyID, nil
}
