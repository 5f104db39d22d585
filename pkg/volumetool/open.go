package volumetool

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"path/filepath"
	"time"

	"github.com/csi-encdisk/csi-encdisk/pkg/blockdev"
	"github.com/csi-encdisk/csi-encdisk/pkg/nodestate"
	"github.com/csi-encdisk/csi-encdisk/pkg/staging"
)

// DefaultOpenRunRoot holds the state and run directories of the images
// opened with Open.
const DefaultOpenRunRoot = "/run/csi-encdisk/open"

// OpenOptions say how Open unlocks an image and what it makes of it.
type OpenOptions struct {
	Image string
	// Exactly one of: a key file whose bytes are the passphrase (as
	// cryptsetup reads it), or the unix:// endpoint of a KMS v2 plugin that
	// unwraps the header's token. Only the engine reads either.
	KeyFile     string
	KMSEndpoint string
	// MountDir: mount the filesystem found on the volume here; "" for the
	// block device only. A volume without a filesystem is never formatted.
	MountDir     string
	RunRoot      string // DefaultOpenRunRoot if ""
	EngineBinary string // the csi-encdisk binary
	// BufferedBacking opens the image without O_DIRECT (measurements).
	BufferedBacking bool
}

// Open unlocks a LUKS2 aes-xts-plain64 image (made by csi-encdisk or
// cryptsetup) the way the node stages a volume (pkg/staging: an engine that
// unlocks it itself, a loop device, the filesystem mounted if asked) and
// returns the volume's state; Close undoes it. Opening again the same way
// is success.
func Open(ctx context.Context, o OpenOptions) (*nodestate.Volume, error) {
	if (o.KeyFile == "") == (o.KMSEndpoint == "") {
		return nil, errors.New("give exactly one of a key file and a KMS endpoint")
	}
	image, err := filepath.Abs(o.Image)
	if err != nil {
		return nil, err
	}
	m, id, err := openManager(o.RunRoot, image, o.EngineBinary, o.KMSEndpoint, o.BufferedBacking)
	if err != nil {
		return nil, err
	}
	req := staging.Request{VolumeID: id, Image: image, Access: nodestate.AccessBlock, NeverFormat: true}
	if o.KeyFile != "" {
		if req.PassphraseFile, err = filepath.Abs(o.KeyFile); err != nil {
			return nil, err
		}
	}
	if o.MountDir != "" {
		req.Access = nodestate.AccessMount
		if req.StagingPath, err = filepath.Abs(o.MountDir); err != nil {
			return nil, err
		}
	}
	return m.Stage(ctx, req)
}

// Close undoes Open for image: unmount, detach the loop device, stop the
// engine, remove the state. An image that is not open is success: it is
// safe to repeat.
func Close(ctx context.Context, image, runRoot string) error {
	abs, err := filepath.Abs(image)
	if err != nil {
		return err
	}
	m, id, err := openManager(runRoot, abs, "csi-encdisk", "", false)
	if err != nil {
		return err
	}
	v, err := m.Load(id)
	if err != nil {
		return err
	}
	path := ""
	if v != nil {
		path = v.StagingPath
	}
	return m.Unstage(ctx, id, abs, path)
}

// openManager is the staging manager of images opened by hand: its state
// lives under runRoot, one volume per image path.
func openManager(runRoot, image, engineBinary, kmsEndpoint string, buffered bool) (*staging.Manager, string, error) {
	if runRoot == "" {
		runRoot = DefaultOpenRunRoot
	}
	st, err := nodestate.Open(runRoot)
	if err != nil {
		return nil, "", err
	}
	cfg := staging.Config{Store: st, EngineBinary: engineBinary, Reserved: []string{runRoot}, BufferedBacking: buffered}
	if kmsEndpoint != "" {
		cfg.KMS = singleKMS(kmsEndpoint)
	}
	m, err := staging.New(cfg)
	if err != nil {
		return nil, "", err
	}
	sum := sha256.Sum256([]byte(image))
	return m, "open-" + hex.EncodeToString(sum[:8]), nil
}

// singleKMS sends every kmsID to one plugin.
type singleKMS string

func (k singleKMS) Endpoint(string) (string, time.Duration, error) { return string(k), 0, nil }
func (singleKMS) CountCalls(string, []blockdev.KMSCall)            {}
