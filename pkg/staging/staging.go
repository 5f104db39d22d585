// Package staging is the life of a volume staged on a node: Stage (an
// image file's own header decides: an encrypted image gets an engine process
// that unlocks it and serves its plaintext as a FUSE file, a plain image is
// used as it is; an image in Ceph RBD always gets an engine, in the mode the
// volume context says and its record confirms), a loop device on that, a
// filesystem on the loop device; Publish and Unpublish at targets; Teardown
// in reverse order; Health, Usage, Expand; and Recover after a restart. The
// CSI node service and `volume open/close` both run it. Callers serialise
// calls per volume.
//
// The node trusts only the image and what it made itself: it never holds a
// passphrase or volume key (the engine gets and keeps them), it attaches
// nothing when the caller's idea of the volume's encryption disagrees with
// the image (or, in Ceph RBD, with the image's record), it refuses paths inside its own data directories, and it
// removes or unmounts only what its state records for a volume at a path.
// Errors wrap the sentinels below (and blockdev's unlock sentinels), so a
// caller can answer with the right code.
package staging

import (
	"errors"
	"time"

	"github.com/csi-encdisk/csi-encdisk/pkg/blockdev"
	"github.com/csi-encdisk/csi-encdisk/pkg/nodestate"
)

// Sentinel errors. Every error of this package that a caller may want to
// answer differently from "internal" wraps one of these.
var (
	// ErrReservedPath: a staging or target path lies inside a directory the
	// node owns (its pool, state or KMS directory).
	ErrReservedPath = errors.New("path inside the driver's own directories")
	// ErrStagedElsewhere: the volume is already staged at another path.
	ErrStagedElsewhere = errors.New("volume already staged at another path")
	// ErrIncompatible: staged or published here already, with another
	// capability or read-only setting.
	ErrIncompatible = errors.New("already staged or published here with another capability")
	// ErrStillPublished: the volume still has publish targets.
	ErrStillPublished = errors.New("volume still published")
	// ErrNotStaged: the volume is not staged on this node.
	ErrNotStaged = errors.New("volume not staged on this node")
	// ErrNoFilesystem: a read-only volume has no filesystem to mount.
	ErrNoFilesystem = errors.New("no filesystem on the volume")
	// ErrFilesystemMismatch: the volume holds another filesystem than asked.
	ErrFilesystemMismatch = errors.New("the volume holds another filesystem")
	// ErrTargetBusy: something this node did not put there is mounted at
	// the target, or the volume is single-writer and published elsewhere.
	ErrTargetBusy = errors.New("target in use")
	// ErrAccessMismatch: block access asked of a volume staged for mount, or
	// the reverse.
	ErrAccessMismatch = errors.New("access type differs from the stage")
	// ErrNoKMS: an encrypted volume on a node without a KMS for its kmsID.
	ErrNoKMS = errors.New("no KMS configured for the volume's kmsID")
	// ErrImageTooSmall: expansion asked for more than the image holds.
	ErrImageTooSmall = errors.New("the image is smaller than asked")
	// ErrTeardownIncomplete: a piece of the stage (engine, loop device,
	// mount) is still there after teardown.
	ErrTeardownIncomplete = errors.New("teardown left pieces behind")
)

// The unlock sentinels come from the engine starter; they are re-exported
// so that callers need only this package.
var (
	ErrBadHeader       = blockdev.ErrBadHeader
	ErrKMSUnavailable  = blockdev.ErrKMSUnavailable
	ErrKMSRefused      = blockdev.ErrKMSRefused
	ErrWrongPassphrase = blockdev.ErrWrongPassphrase
	// ErrInUse: another engine or node serves the image (one writer per
	// image, pkg/imagelock).
	ErrInUse = blockdev.ErrInUse
	// ErrEncryptionMismatch: the caller says encrypted and the image is not,
	// or the reverse (an image file's header says so; an RBD image's record,
	// which its engine checks). Nothing is attached.
	ErrEncryptionMismatch = blockdev.ErrEncryptionMismatch
)

// KMS tells the engine which plugin unwraps a volume of a kmsID and takes
// the count of the calls the engine made (the node's KMS metrics).
type KMS interface {
	// Endpoint is the unix:// endpoint and the per-call timeout of the
	// plugin configured for kmsID; an error wrapping ErrNoKMS when none is.
	Endpoint(kmsID string) (endpoint string, timeout time.Duration, err error)
	// CountCalls records calls that an engine made to that plugin.
	CountCalls(kmsID string, calls []blockdev.KMSCall)
}

// Config configures a Manager.
type Config struct {
	// Store keeps the per-volume state (no secrets).
	Store *nodestate.Store
	// EngineBinary is the csi-encdisk executable started as `engine`.
	EngineBinary string
	// Engines starts and stops engines (DirectEngines{EngineBinary} if nil).
	Engines Engines
	// KMS resolves kmsIDs for encrypted volumes (nil: none configured).
	KMS KMS
	// Reserved directories may hold neither a staging nor a target path.
	Reserved []string
	// BufferedBacking makes engines open images without O_DIRECT (measurements).
	BufferedBacking bool
	// FUSETransport is blockdev.EngineSpec.FUSETransport of the engines
	// started ("" is classic).
	FUSETransport string
}

// Manager runs the life of the volumes staged through it.
type Manager struct {
	cfg Config
}

// New checks cfg and returns a Manager.
func New(cfg Config) (*Manager, error) {
	switch {
	case cfg.Store == nil:
		return nil, errors.New("staging: a state store is required")
	case cfg.EngineBinary == "":
		return nil, errors.New("staging: the engine binary is required")
	}
	if cfg.Engines == nil {
		cfg.Engines = DirectEngines{Binary: cfg.EngineBinary}
	}
	return &Manager{cfg: cfg}, nil
}

// Load returns a volume's state, nil when the node has none.
func (m *Manager) Load(volumeID string) (*nodestate.Volume, error) {
	v, err := m.cfg.Store.Load(volumeID)
	if errors.Is(err, nodestate.ErrNotFound) {
		return nil, nil
	}
	return v, err
}

// Staged returns the state of a volume whose stage finished, or an error
// wrapping ErrNotStaged.
func (m *Manager) Staged(volumeID string) (*nodestate.Volume, error) {
	v, err := m.Load(volumeID)
	if err != nil {
		return nil, err
	}
	if v == nil || v.Phase != nodestate.PhaseStaged {
		return nil, ErrNotStaged
	}
	return v, nil
}

// List returns every volume the node has state for.
func (m *Manager) List() ([]*nodestate.Volume, error) { return m.cfg.Store.List() }
