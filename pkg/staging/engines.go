package staging

import (
	"context"
	"errors"
	"fmt"

	"github.com/csi-encdisk/csi-encdisk/pkg/blockdev"
	"github.com/csi-encdisk/csi-encdisk/pkg/enginehost"
	"github.com/csi-encdisk/csi-encdisk/pkg/rbd"
)

// Engines starts and stops the engines of encrypted volumes: directly (the
// engine is a child of this process and mounts its FUSE file itself), or
// through an engine host that keeps every engine's connection and replaces
// an engine that dies.
type Engines interface {
	Start(ctx context.Context, spec blockdev.EngineSpec) (*blockdev.Engine, *blockdev.StartReport, error)
	// Stop ends the volume's engine and its FUSE mount; pid 0: find it.
	Stop(ctx context.Context, volumeID string, pid int, runDir string) error
	// Supervision says how often a supervisor replaced the volume's engine
	// and why it left it down ("" if it did not).
	Supervision(ctx context.Context, volumeID string) Supervision
}

// Supervision is what a supervisor knows about a volume's engine.
type Supervision struct {
	Restarts int    // engines started after the first (deaths and upgrades)
	Failed   string // why the supervisor left the engine down
}

// DirectEngines runs engines as children of this process.
type DirectEngines struct{ Binary string }

// Start starts an engine that mounts its FUSE file itself. An engine of an
// image in Ceph RBD gets the credentials that ctx carries (rbd.WithCredentials:
// the NodeStageVolume secrets) on an inherited pipe.
func (d DirectEngines) Start(ctx context.Context, spec blockdev.EngineSpec) (*blockdev.Engine, *blockdev.StartReport, error) {
	if isRBD(spec.Image) {
		c, err := stageCredentials(ctx, spec)
		if err != nil {
			return nil, nil, err
		}
		return blockdev.StartEngineWithCredentials(ctx, d.Binary, spec, c)
	}
	return blockdev.StartEngine(ctx, d.Binary, spec)
}

// stageCredentials are the Ceph credentials ctx carries for an RBD image.
func stageCredentials(ctx context.Context, spec blockdev.EngineSpec) (*rbd.Credentials, error) {
	c := rbd.CredentialsFrom(ctx)
	if c == nil {
		return nil, fmt.Errorf("volume %s: %w (node-stage-secret)", spec.VolumeID, rbd.ErrNoCredentials)
	}
	return c, nil
}

// isRBD reports whether image is in Ceph RBD ("rbd:POOL/IMAGE").
func isRBD(image string) bool {
	_, ok := rbd.ParseRef(image)
	return ok
}

// Stop stops the engine and unmounts its FUSE file.
func (DirectEngines) Stop(ctx context.Context, _ string, pid int, runDir string) error {
	return blockdev.StopEngine(ctx, pid, runDir)
}

// Supervision is empty: nobody replaces a direct engine.
func (DirectEngines) Supervision(context.Context, string) Supervision { return Supervision{} }

// HostEngines runs engines through an engine host.
type HostEngines struct{ Client enginehost.Client }

// Start asks the host to mount the FUSE file and start the engine. An
// engine of an image in Ceph RBD needs the credentials that ctx carries (the
// NodeStageVolume secrets): the request carries them, and the host keeps
// them in memory to start the volume's replacement engines.
func (h HostEngines) Start(ctx context.Context, spec blockdev.EngineSpec) (*blockdev.Engine, *blockdev.StartReport, error) {
	var c *rbd.Credentials
	if isRBD(spec.Image) {
		var err error
		if c, err = stageCredentials(ctx, spec); err != nil {
			return nil, nil, err
		}
	}
	return h.Client.Start(ctx, spec, c)
}

// Stop asks the host to end the engine; an engine the host does not know
// (its records were lost) is stopped directly.
func (h HostEngines) Stop(ctx context.Context, volumeID string, pid int, runDir string) error {
	if err := h.Client.Stop(ctx, volumeID); err != nil {
		return err
	}
	if blockdev.FindEngine(runDir) > 0 {
		return blockdev.StopEngine(ctx, pid, runDir)
	}
	return blockdev.UnmountEngine(ctx, runDir)
}

// Supervision asks the host about the engine.
func (h HostEngines) Supervision(ctx context.Context, volumeID string) Supervision {
	st, err := h.Client.Status(ctx, volumeID)
	if err != nil {
		if errors.Is(err, enginehost.ErrUnknownVolume) {
			return Supervision{}
		}
		return Supervision{Failed: "the engine host does not answer: " + err.Error()}
	}
	return Supervision{Restarts: st.Restarts, Failed: st.Failed}
}
