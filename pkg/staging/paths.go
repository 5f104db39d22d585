package staging

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// checkPath refuses a relative path and a path inside a reserved directory
// (after resolving the symlinks of the part that exists): mounted over the
// pool it would break every later CreateVolume, over the state directory it
// would hide the node's own records.
func (m *Manager) checkPath(field, path string) error {
	if !filepath.IsAbs(path) {
		return fmt.Errorf("%s %q must be an absolute path", field, path)
	}
	p := resolve(path)
	for _, r := range m.cfg.Reserved {
		if r == "" {
			continue
		}
		root := resolve(r)
		if p == root || strings.HasPrefix(p, root+string(filepath.Separator)) || strings.HasPrefix(root, p+string(filepath.Separator)) {
			return fmt.Errorf("%w: %s %s overlaps the driver's directory %s", ErrReservedPath, field, path, r)
		}
	}
	return nil
}

// resolve cleans path and resolves the symlinks of its longest existing
// prefix (the rest may not exist yet).
func resolve(path string) string {
	p := filepath.Clean(path)
	rest := ""
	for {
		if r, err := filepath.EvalSymlinks(p); err == nil {
			return filepath.Join(r, rest)
		}
		parent := filepath.Dir(p)
		if parent == p {
			return filepath.Join(p, rest)
		}
		rest = filepath.Join(filepath.Base(p), rest)
		p = parent
	}
}

// pathExists reports whether path exists, without following a last symlink.
func pathExists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}
