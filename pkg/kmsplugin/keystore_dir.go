package kmsplugin

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// DirKeystore keeps master keys as 32-byte files DIR/<region>/v<N>.key with
// mode 0600 in 0700 directories, written atomically and never overwritten.
// It refuses key files or directories that others may read.
type DirKeystore struct {
	dir   string
	mu    sync.Mutex
	cache map[string]cipher.AEAD // "region/vN" -> GCM
}

// OpenDirKeystore opens an existing directory keystore. A directory that
// does not exist is refused (a typo must not become a new, empty keystore
// that later answers "no such master key version"); InitDirKeystore
// creates one.
func OpenDirKeystore(dir string) (*DirKeystore, error) {
	if dir == "" || !filepath.IsAbs(dir) {
		return nil, fmt.Errorf("keystore dir %q: want an absolute path", dir)
	}
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("keystore dir %s does not exist (create it with --create-keystore, or fix the path)", dir)
	}
	return openDirKeystore(dir)
}

// InitDirKeystore opens a directory keystore, creating the directory
// (mode 0700) if it is missing: only on an explicit request. An existing
// directory that is still empty is tightened to 0700 (a hostPath volume of
// type DirectoryOrCreate is made 0755 by kubelet); one that holds anything
// keeps its mode, and a loose one is refused.
func InitDirKeystore(dir string) (*DirKeystore, error) {
	if dir == "" || !filepath.IsAbs(dir) {
		return nil, fmt.Errorf("keystore dir %q: want an absolute path", dir)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("keystore dir: %w", err)
	}
	if entries, err := os.ReadDir(dir); err == nil && len(entries) == 0 {
		if err := os.Chmod(dir, 0o700); err != nil {
			return nil, fmt.Errorf("keystore dir: %w", err)
		}
	}
	return openDirKeystore(dir)
}

func openDirKeystore(dir string) (*DirKeystore, error) {
	if err := checkPrivate(dir, true); err != nil {
		return nil, err
	}
	return &DirKeystore{dir: dir, cache: map[string]cipher.AEAD{}}, nil
}

// checkPrivate refuses a path whose mode lets group or others in.
func checkPrivate(path string, isDir bool) error {
	st, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("keystore: %w", err)
	}
	if st.IsDir() != isDir {
		return fmt.Errorf("keystore: %s: unexpected file type", path)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return fmt.Errorf("keystore: %s has mode %o; refusing it (want %o: only the owner may access master keys)", path, st.Mode().Perm(), map[bool]os.FileMode{true: 0o700, false: 0o600}[isDir])
	}
	return nil
}

func (d *DirKeystore) regionDir(region string) string { return filepath.Join(d.dir, region) }

func (d *DirKeystore) keyPath(region string, v int) string {
	return filepath.Join(d.regionDir(region), fmt.Sprintf("v%d.key", v))
}

// Versions lists the region's key versions.
func (d *DirKeystore) Versions(region string) ([]int, error) {
	if err := ValidateRegion(region); err != nil {
		return nil, err
	}
	entries, err := os.ReadDir(d.regionDir(region))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("keystore: %w", err)
	}
	var vs []int
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), ".key")
		if !ok || !strings.HasPrefix(name, "v") {
			continue
		}
		v, err := strconv.Atoi(name[1:])
		if err != nil || v < 1 {
			continue
		}
		vs = append(vs, v)
	}
	sort.Ints(vs)
	return vs, nil
}

// Create writes a new random key version: temp file, fsync, link to the
// final name (which fails if it exists: keys are never replaced), fsync of
// the directory.
func (d *DirKeystore) Create(region string, v int) error {
	if err := ValidateRegion(region); err != nil {
		return err
	}
	rdir := d.regionDir(region)
	if err := os.MkdirAll(rdir, 0o700); err != nil {
		return fmt.Errorf("keystore: %w", err)
	}
	if err := checkPrivate(rdir, true); err != nil {
		return err
	}
	key := make([]byte, 32)
	defer clear(key)
	if _, err := rand.Read(key); err != nil {
		return fmt.Errorf("keystore: random: %w", err)
	}
	tmp, err := os.CreateTemp(rdir, ".new-*")
	if err != nil {
		return fmt.Errorf("keystore: %w", err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return fmt.Errorf("keystore: %w", err)
	}
	if _, err := tmp.Write(key); err != nil {
		tmp.Close()
		return fmt.Errorf("keystore: write key: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("keystore: sync key: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("keystore: %w", err)
	}
	if err := os.Link(tmp.Name(), d.keyPath(region, v)); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("keystore: %s exists: master keys are never replaced", KeyID(region, v))
		}
		return fmt.Errorf("keystore: %w", err)
	}
	return syncDir(rdir)
}

func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("keystore: %w", err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil && !errors.Is(err, syscall.EINVAL) {
		return fmt.Errorf("keystore: sync %s: %w", dir, err)
	}
	return nil
}

// aead returns the GCM of a key version, loading it once.
func (d *DirKeystore) aead(region string, v int) (cipher.AEAD, error) {
	id := KeyID(region, v)
	d.mu.Lock()
	defer d.mu.Unlock()
	if g, ok := d.cache[id]; ok {
		return g, nil
	}
	path := d.keyPath(region, v)
	if err := checkPrivate(path, false); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, errNoKey
		}
		return nil, err
	}
	key, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("keystore: read %s: %w", id, err)
	}
	defer clear(key)
	if len(key) != 32 {
		return nil, fmt.Errorf("keystore: %s: key file of %d bytes, want 32", id, len(key))
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	g, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	d.cache[id] = g
	return g, nil
}

// Seal encrypts with AES-256-GCM: a random 12-byte nonce, then the sealed data.
func (d *DirKeystore) Seal(region string, v int, plaintext, aad []byte) ([]byte, error) {
	g, err := d.aead(region, v)
	if err != nil {
		return nil, err
	}
	nonce := make([]byte, g.NonceSize(), g.NonceSize()+len(plaintext)+g.Overhead())
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	return g.Seal(nonce, nonce, plaintext, aad), nil
}

// Open reverses Seal.
func (d *DirKeystore) Open(region string, v int, ciphertext, aad []byte) ([]byte, error) {
	g, err := d.aead(region, v)
	if err != nil {
		return nil, err
	}
	if len(ciphertext) < g.NonceSize()+g.Overhead() {
		return nil, errors.New("ciphertext too short")
	}
	return g.Open(nil, ciphertext[:g.NonceSize()], ciphertext[g.NonceSize():], aad)
}

// Close drops cached keys.
func (d *DirKeystore) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.cache = map[string]cipher.AEAD{}
	return nil
}

func (d *DirKeystore) disabledPath(region string, v int) string {
	return filepath.Join(d.regionDir(region), fmt.Sprintf("v%d.disabled", v))
}

// Disabled reports whether key version v of region is disabled.
func (d *DirKeystore) Disabled(region string, v int) (bool, error) {
	if err := ValidateRegion(region); err != nil {
		return false, err
	}
	_, err := os.Stat(d.disabledPath(region, v))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("keystore: %w", err)
	}
	return true, nil
}

// SetDisabled disables (a marker file next to the key) or re-enables key
// version v of region. The key itself stays, so disabling can be undone.
func (d *DirKeystore) SetDisabled(region string, v int, disabled bool) error {
	if err := ValidateRegion(region); err != nil {
		return err
	}
	path := d.disabledPath(region, v)
	if !disabled {
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("keystore: %w", err)
		}
		return syncDir(d.regionDir(region))
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("keystore: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("keystore: %w", err)
	}
	return syncDir(d.regionDir(region))
}
