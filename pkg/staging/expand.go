package staging

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/blockdev"
	"github.com/csi-encdisk/csi-encdisk/pkg/filesystem"
	"github.com/csi-encdisk/csi-encdisk/pkg/loopdev"
	"github.com/csi-encdisk/csi-encdisk/pkg/nodestate"
)

// engineResizeTimeout bounds the engine's resize call.
const engineResizeTimeout = 30 * time.Second

// Expand grows a staged volume to the size of its image (which the
// controller already grew): the engine's data size, the loop device, then
// the filesystem, online. It returns the new data size. required is the
// least size the caller needs; an image that holds less is ErrImageTooSmall.
func (m *Manager) Expand(ctx context.Context, v *nodestate.Volume, required int64) (int64, error) {
	if isRBD(v.Image) {
		return m.expandRBD(ctx, v, required)
	}
	fi, err := os.Stat(v.Image)
	if err != nil {
		return 0, fmt.Errorf("stat image: %w", err)
	}
	dataSize := fi.Size()
	if v.Encrypted {
		if v.Engine == nil {
			return 0, fmt.Errorf("volume %q is staged without an engine", v.VolumeID)
		}
		dataSize -= v.Engine.DataOffset
	}
	if v.SectorSize > 0 {
		dataSize -= dataSize % int64(v.SectorSize)
	}
	if required > dataSize {
		return 0, fmt.Errorf("%w: volume %q: the image holds %d bytes, less than the %d asked; expand it through the controller first", ErrImageTooSmall, v.VolumeID, dataSize, required)
	}
	if v.Encrypted {
		rctx, cancel := context.WithTimeout(ctx, engineResizeTimeout)
		err := blockdev.DialControl(v.Engine.ControlSocket).Resize(rctx, dataSize)
		cancel()
		if err != nil {
			return 0, fmt.Errorf("resize the engine to %d bytes: %w", dataSize, err)
		}
	}
	return m.growOnDevice(ctx, v, dataSize)
}

// expandRBD grows a volume whose image is in Ceph RBD: only its engine can
// see the image's size, so it is asked to take all of it, then tells what
// it serves.
func (m *Manager) expandRBD(ctx context.Context, v *nodestate.Volume, required int64) (int64, error) {
	if v.Engine == nil {
		return 0, fmt.Errorf("volume %q is staged without an engine", v.VolumeID)
	}
	rctx, cancel := context.WithTimeout(ctx, engineResizeTimeout)
	defer cancel()
	ctl := blockdev.DialControl(v.Engine.ControlSocket)
	if err := ctl.Resize(rctx, 0); err != nil {
		return 0, fmt.Errorf("resize the engine to its image: %w", err)
	}
	st, err := ctl.Stats(rctx)
	if err != nil {
		return 0, fmt.Errorf("read the engine's size: %w", err)
	}
	if required > st.Size {
		return 0, fmt.Errorf("%w: volume %q: the image holds %d bytes, less than the %d asked; expand it through the controller first", ErrImageTooSmall, v.VolumeID, st.Size, required)
	}
	return m.growOnDevice(ctx, v, st.Size)
}

// growOnDevice grows the loop device and the filesystem to dataSize, which
// the engine (or the image) already serves.
func (m *Manager) growOnDevice(ctx context.Context, v *nodestate.Volume, dataSize int64) (int64, error) {
	if err := loopdev.SetCapacity(ctx, v.Loop); err != nil {
		return 0, err
	}
	if v.AccessType != nodestate.AccessMount {
		return dataSize, nil
	}
	err := filesystem.Resize(ctx, v.Loop, v.StagingPath, v.FSType)
	if err == nil {
		return dataSize, nil
	}
	if !errors.Is(err, filesystem.ErrResizeNotPermitted) || Published(v) {
		return 0, fmt.Errorf("grow the %s filesystem online: %w", v.FSType, err)
	}
	// ext4's online resize needs CAP_SYS_RESOURCE, which some node
	// containers lack. Nothing uses the volume yet (kubelet expands between
	// stage and publish), so grow it offline instead.
	klog.FromContext(ctx).Info("Online ext4 resize refused, growing offline", "volumeID", v.VolumeID, "error", err.Error())
	if err := filesystem.GrowExt4Offline(ctx, v.Loop, v.StagingPath, mountOptions(v)); err != nil {
		return 0, fmt.Errorf("grow the ext4 filesystem offline: %w", err)
	}
	return dataSize, nil
}
