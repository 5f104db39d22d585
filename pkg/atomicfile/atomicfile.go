// Package atomicfile writes files so that a crash leaves either the old or
// the new content, never a mix: the data goes to a temporary file in the
// same directory, is synced, and is then renamed (or linked) into place,
// and the directory is synced.
package atomicfile

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
)

// tempPattern names the temporary files; the leading dot keeps them out of
// directory listings that skip hidden names.
const tempPattern = ".tmp-*"

// WriteFile replaces path with data, atomically and durably. The file ends
// with exactly perm, whatever the process umask. On any failure the
// temporary file is removed and path is left as it was.
func WriteFile(path string, data []byte, perm os.FileMode) error {
	tmp, err := writeTemp(path, data, perm)
	if err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("atomicfile: rename into %s: %w", path, err)
	}
	return SyncDir(filepath.Dir(path))
}

// Create writes a new file at path with data and perm (exactly, whatever
// the umask), atomically and durably, but never replaces an existing file:
// if path exists the error wraps fs.ErrExist and path is untouched. Meant
// for files that must never be overwritten, such as master keys.
func Create(path string, data []byte, perm os.FileMode) error {
	tmp, err := writeTemp(path, data, perm)
	if err != nil {
		return err
	}
	defer os.Remove(tmp)
	// link(2) fails with EEXIST instead of replacing path, unlike rename(2).
	if err := os.Link(tmp, path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("atomicfile: create %s: %w", path, fs.ErrExist)
		}
		return fmt.Errorf("atomicfile: create %s: %w", path, err)
	}
	if err := os.Remove(tmp); err != nil {
		return fmt.Errorf("atomicfile: remove temporary %s: %w", tmp, err)
	}
	return SyncDir(filepath.Dir(path))
}

// writeTemp writes data to a synced and closed temporary file next to path
// and returns its name; on failure nothing is left behind.
func writeTemp(path string, data []byte, perm os.FileMode) (name string, err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, tempPattern)
	if err != nil {
		return "", fmt.Errorf("atomicfile: write %s: %w", path, err)
	}
	name = f.Name()
	defer func() {
		if err != nil {
			_ = f.Close()
			_ = os.Remove(name)
		}
	}()
	// fchmod is not subject to the umask, unlike the mode given to open(2).
	if err := f.Chmod(perm); err != nil {
		return "", fmt.Errorf("atomicfile: set mode of %s: %w", name, err)
	}
	if _, err := f.Write(data); err != nil {
		return "", fmt.Errorf("atomicfile: write %s: %w", name, err)
	}
	if err := f.Sync(); err != nil {
		return "", fmt.Errorf("atomicfile: sync %s: %w", name, err)
	}
	if err := f.Close(); err != nil {
		return "", fmt.Errorf("atomicfile: close %s: %w", name, err)
	}
	return name, nil
}

// SyncDir fsyncs a directory so that the names created, renamed or removed
// in it survive a crash. A filesystem that cannot sync directories
// (EINVAL) is not an error: there the rename is as durable as it gets.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("atomicfile: open directory %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil && !errors.Is(err, syscall.EINVAL) {
		return fmt.Errorf("atomicfile: sync directory %s: %w", dir, err)
	}
	return nil
}
