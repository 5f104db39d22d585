package blockdev

import (
	"errors"
	"fmt"
	"path/filepath"
)

// EngineSpec says which image an engine serves and how. It holds no secret:
// it goes into the engine's argv and into node state files.
type EngineSpec struct {
	VolumeID      string
	Image         string // path of the LUKS2 image
	DataOffset    int64  // bytes from the start of the image to the data segment
	SectorSize    int    // encryption sector size: 512 or 4096
	AllowDiscards bool   // punch holes on discard; all-zero ciphertext reads as zeros
	RunDir        string // per-volume dir: FUSE mount RunDir/fuse, control socket RunDir/control.sock
	// BufferedBacking opens the image without O_DIRECT (for measurements;
	// the default, O_DIRECT, avoids caching every block twice).
	BufferedBacking bool
}

// Engine is a started engine process.
type Engine struct {
	PID           int
	File          string // the plaintext FUSE file, RunDir/fuse/disk
	ControlSocket string // RunDir/control.sock
}

// FUSEDir is the FUSE mountpoint of the engine whose run dir is runDir.
func FUSEDir(runDir string) string { return filepath.Join(runDir, "fuse") }

// FileName is the name of the plaintext file inside the FUSE mount.
const FileName = "disk"

// PlainFile is the plaintext file served by the engine whose run dir is runDir.
func PlainFile(runDir string) string { return filepath.Join(runDir, "fuse", FileName) }

// ControlSocketPath is the control socket of the engine whose run dir is runDir.
func ControlSocketPath(runDir string) string { return filepath.Join(runDir, "control.sock") }

// Validate checks every field and names the first bad one.
// maxSocketPath is the size of sun_path in struct sockaddr_un on Linux.
const maxSocketPath = 108

func (s EngineSpec) Validate() error {
	switch {
	case s.VolumeID == "":
		return errors.New("engine spec: volume ID is empty")
	case s.Image == "" || !filepath.IsAbs(s.Image):
		return fmt.Errorf("engine spec: image %q must be an absolute path", s.Image)
	case s.DataOffset < 0 || s.DataOffset%512 != 0:
		return fmt.Errorf("engine spec: data offset %d must be a non-negative multiple of 512", s.DataOffset)
	case s.SectorSize != 512 && s.SectorSize != 4096:
		return fmt.Errorf("engine spec: sector size %d must be 512 or 4096", s.SectorSize)
	case s.RunDir == "" || !filepath.IsAbs(s.RunDir):
		return fmt.Errorf("engine spec: run dir %q must be an absolute path", s.RunDir)
	case len(ControlSocketPath(s.RunDir)) >= maxSocketPath:
		return fmt.Errorf("engine spec: control socket %s is longer than a unix socket path may be (%d bytes): use a shorter state directory", ControlSocketPath(s.RunDir), maxSocketPath-1)
	}
	return nil
}

// Args is the argv (after the binary) that runs the engine for s.
func (s EngineSpec) Args() []string {
	args := []string{"engine",
		"--image", s.Image,
		"--data-offset", fmt.Sprint(s.DataOffset),
		"--sector-size", fmt.Sprint(s.SectorSize),
		"--run-dir", s.RunDir,
		"--volume-id", s.VolumeID,
	}
	if s.AllowDiscards {
		args = append(args, "--allow-discards")
	}
	if s.BufferedBacking {
		args = append(args, "--buffered-backing")
	}
	return args
}
