// Package nodestate keeps what the node service knows about each staged
// volume: one small JSON file per volume in a state directory, written
// atomically, so that a restarted node plugin can find the engines, loop
// devices and mounts it left behind. It never holds a secret: no volume key,
// no passphrase, no wrapped key.
package nodestate

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/csi-encdisk/csi-encdisk/pkg/atomicfile"
)

// Phase says how far NodeStageVolume got.
type Phase string

const (
	// PhaseStaging marks a stage that has started but not finished: its
	// pieces may be half made and are torn down on recovery.
	PhaseStaging Phase = "staging"
	// PhaseStaged marks a volume whose stage completed.
	PhaseStaged Phase = "staged"
)

// Access types of a staged volume.
const (
	AccessMount = "mount"
	AccessBlock = "block"
)

// Engine is the userspace engine serving an encrypted volume.
type Engine struct {
	PID           int    `json:"pid"`
	File          string `json:"file"`
	ControlSocket string `json:"controlSocket"`
	DataOffset    int64  `json:"dataOffset"`
	AllowDiscards bool   `json:"allowDiscards,omitempty"`
}

// Volume is the state of one staged (or half-staged) volume.
type Volume struct {
	VolumeID    string   `json:"volumeID"`
	Phase       Phase    `json:"phase"`
	Encrypted   bool     `json:"encrypted"`
	Image       string   `json:"image"`
	SectorSize  int      `json:"sectorSize"`
	StagingPath string   `json:"stagingPath"`
	AccessType  string   `json:"accessType"`
	FSType      string   `json:"fsType,omitempty"`
	MountFlags  []string `json:"mountFlags,omitempty"`
	ReadOnly    bool     `json:"readOnly,omitempty"`
	// RunDir is the per-volume run directory (FUSE mountpoint, control socket).
	RunDir string `json:"runDir,omitempty"`
	// Loop is the loop device, once attached.
	Loop string `json:"loop,omitempty"`
	// LoopBackingDev and LoopBackingInode identify the loop device's backing
	// file (the image, or the engine's FUSE file), recorded before the
	// attach: a loop device is found by them, never by path text.
	LoopBackingDev   uint64 `json:"loopBackingDev,omitempty"`
	LoopBackingInode uint64 `json:"loopBackingInode,omitempty"`
	// LoopDiskSeq is the loop device's disk sequence number at attach: it
	// tells this attachment from a later one of the same device number.
	LoopDiskSeq uint64 `json:"loopDiskSeq,omitempty"`
	// Engine is set once the engine of an encrypted volume started.
	Engine *Engine `json:"engine,omitempty"`
	// Targets lists the publish target paths.
	Targets   []string  `json:"targets,omitempty"`
	UpdatedAt time.Time `json:"updatedAt"`
}

// HasTarget reports whether target is among the volume's publish targets.
func (v *Volume) HasTarget(target string) bool {
	for _, t := range v.Targets {
		if t == target {
			return true
		}
	}
	return false
}

// AddTarget records a publish target (once).
func (v *Volume) AddTarget(target string) {
	if !v.HasTarget(target) {
		v.Targets = append(v.Targets, target)
	}
}

// RemoveTarget forgets a publish target.
func (v *Volume) RemoveTarget(target string) {
	out := v.Targets[:0]
	for _, t := range v.Targets {
		if t != target {
			out = append(out, t)
		}
	}
	v.Targets = out
}

// ErrNotFound is returned by Load when no state exists for a volume.
var ErrNotFound = errors.New("no node state for volume")

// Store is a directory of per-volume state files.
type Store struct {
	dir string
}

const (
	volumesDir = "volumes"
	runDir     = "run"
)

// Open creates (if needed) and opens the state directory dir.
func Open(dir string) (*Store, error) {
	if dir == "" {
		return nil, errors.New("nodestate: state directory must not be empty")
	}
	for _, d := range []string{filepath.Join(dir, volumesDir), filepath.Join(dir, runDir)} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("nodestate: create %s: %w", d, err)
		}
	}
	return &Store{dir: dir}, nil
}

// Dir returns the state directory.
func (s *Store) Dir() string { return s.dir }

// key maps a volume ID (any string a CO may send) to a short file-name-safe
// name. A short name keeps the control socket path under the 108-byte limit.
func key(volumeID string) string {
	sum := sha256.Sum256([]byte(volumeID))
	return hex.EncodeToString(sum[:10])
}

func (s *Store) path(volumeID string) string {
	return filepath.Join(s.dir, volumesDir, key(volumeID)+".json")
}

// RunDir returns the run directory for a volume (not created).
func (s *Store) RunDir(volumeID string) string {
	return filepath.Join(s.dir, runDir, key(volumeID))
}

// Load reads the state of a volume; ErrNotFound when there is none.
func (s *Store) Load(volumeID string) (*Volume, error) {
	v, err := readFile(s.path(volumeID))
	if errors.Is(err, os.ErrNotExist) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, err
	}
	if v.VolumeID != volumeID {
		return nil, fmt.Errorf("nodestate: %s holds volume %q, not %q", s.path(volumeID), v.VolumeID, volumeID)
	}
	return v, nil
}

func readFile(path string) (*Volume, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("nodestate: read %s: %w", path, err)
	}
	var v Volume
	if err := json.Unmarshal(b, &v); err != nil {
		return nil, fmt.Errorf("nodestate: parse %s: %w", path, err)
	}
	return &v, nil
}

// Save writes the state of a volume atomically: a temporary file in the same
// directory is written, synced and renamed over the old one, and the
// directory is synced, so a crash leaves either the old or the new state.
func (s *Store) Save(v *Volume) error {
	if v.VolumeID == "" {
		return errors.New("nodestate: volume ID must not be empty")
	}
	v.UpdatedAt = time.Now().UTC()
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("nodestate: encode state of %q: %w", v.VolumeID, err)
	}
	if err := atomicfile.WriteFile(s.path(v.VolumeID), append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("nodestate: save state of %q: %w", v.VolumeID, err)
	}
	return nil
}

// Delete removes the state of a volume; a missing state is not an error.
func (s *Store) Delete(volumeID string) error {
	p := s.path(volumeID)
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("nodestate: remove %s: %w", p, err)
	}
	if err := atomicfile.SyncDir(filepath.Dir(p)); err != nil {
		return fmt.Errorf("nodestate: remove state of %q: %w", volumeID, err)
	}
	return nil
}

// List returns the state of every volume, sorted by volume ID. Files that
// cannot be parsed are reported in the error but do not hide the others; the
// slice is nil only when the directory itself cannot be read.
func (s *Store) List() ([]*Volume, error) {
	dir := filepath.Join(s.dir, volumesDir)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("nodestate: list %s: %w", dir, err)
	}
	out := []*Volume{} // non-nil: the directory itself was readable
	var errs []error
	for _, e := range entries {
		name := e.Name()
		if e.IsDir() || !strings.HasSuffix(name, ".json") || strings.HasPrefix(name, ".") {
			continue
		}
		v, err := readFile(filepath.Join(dir, name))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out = append(out, v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].VolumeID < out[j].VolumeID })
	return out, errors.Join(errs...)
}
