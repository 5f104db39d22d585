package staging

import (
	"context"
	"errors"

	"github.com/csi-encdisk/csi-encdisk/pkg/blockdev"
	"github.com/csi-encdisk/csi-encdisk/pkg/enginehost"
)

// Engines starts and stops the engines of encrypted volumes: directly (the
// engine is a child of this process and mounts its FUSE file itself), or
// through an engine host that keeps every engine's connection and replaces
// an engine that dies.
type Engines interface {
	Start(ctx context.Context, spec blockdev.EngineSpec) (*blockdev.Engine, *blockdev.StartReport, error)
	// Stop ends the volume's engine and its FUSE mount; pid 0: find it.
	Stop(ctx context.Context, volumeID string, pid int, runDir string) error
	// Failed says why a supervisor left the volume's engine down ("" if it
	// did not).
	Failed(ctx context.Context, volumeID string) string
}

// DirectEngines runs engines as children of this process.
type DirectEngines struct{ Binary string }

// Start starts an engine that mounts its FUSE file itself.
func (d DirectEngines) Start(ctx context.Context, spec blockdev.EngineSpec) (*blockdev.Engine, *blockdev.StartReport, error) {
	return blockdev.StartEngine(ctx, d.Binary, spec)
}

// Stop stops the engine and unmounts its FUSE file.
func (DirectEngines) Stop(ctx context.Context, _ string, pid int, runDir string) error {
	return blockdev.StopEngine(ctx, pid, runDir)
}

// Failed is always "": nobody restarts a direct engine.
func (DirectEngines) Failed(context.Context, string) string { return "" }

// HostEngines runs engines through an engine host.
type HostEngines struct{ Client enginehost.Client }

// Start asks the host to mount the FUSE file and start the engine.
func (h HostEngines) Start(ctx context.Context, spec blockdev.EngineSpec) (*blockdev.Engine, *blockdev.StartReport, error) {
	return h.Client.Start(ctx, spec)
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

// Failed asks the host whether it gave up on the engine.
func (h HostEngines) Failed(ctx context.Context, volumeID string) string {
	st, err := h.Client.Status(ctx, volumeID)
	if err != nil {
		if errors.Is(err, enginehost.ErrUnknownVolume) {
			return ""
		}
		return "the engine host does not answer: " + err.Error()
	}
	return st.Failed
}
