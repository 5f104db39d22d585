package driver

import (
	"context"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/csi-encdisk/csi-encdisk/pkg/staging"
)

// NodeStageVolume unlocks an encrypted volume in its own engine (or takes a
// plain one as it is), attaches a loop device, and for mount access makes a
// filesystem if the volume has none and mounts it at the staging path.
func (n *NodeServer) NodeStageVolume(ctx context.Context, req *csi.NodeStageVolumeRequest) (*csi.NodeStageVolumeResponse, error) {
	id, path := req.GetVolumeId(), req.GetStagingTargetPath()
	if err := firstError(required("volume_id", id), absolutePath("staging_target_path", path)); err != nil {
		return nil, err
	}
	sreq, err := stageRequest(id, path, req.GetVolumeCapability(), req.GetVolumeContext())
	if err != nil {
		return nil, err
	}
	image, unlock, err := n.lockVolume(ctx, id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	sreq.Image = image
	if _, err := n.stager.Stage(klogContext(ctx, "NodeStageVolume", id), sreq); err != nil {
		return nil, toStatus(err, volumeWhat(id))
	}
	return &csi.NodeStageVolumeResponse{}, nil
}

// stageRequest checks the capability and the volume context of a stage.
func stageRequest(id, path string, c *csi.VolumeCapability, volCtx map[string]string) (staging.Request, error) {
	vc, err := parseNodeCapability(c)
	if err != nil {
		return staging.Request{}, err
	}
	encrypted, err := contextBool(volCtx, ctxEncrypted)
	if err != nil {
		return staging.Request{}, err
	}
	discards, err := contextBool(volCtx, ctxAllowDiscards)
	if err != nil {
		return staging.Request{}, err
	}
	sectorSize, err := contextSectorSize(volCtx)
	if err != nil {
		return staging.Request{}, err
	}
	neverFormat := false
	switch s := volCtx[ctxContentSource]; s {
	case "":
	case "snapshot", "volume":
		neverFormat = true
	default:
		return staging.Request{}, invalid("volume_context.%s: %q: accepts \"snapshot\" or \"volume\"", ctxContentSource, s)
	}
	return staging.Request{
		NeverFormat:   neverFormat,
		VolumeID:      id,
		StagingPath:   path,
		Access:        vc.access,
		FSType:        vc.fsType,
		MountFlags:    vc.mountFlags,
		ReadOnly:      vc.readOnly,
		Encrypted:     encrypted,
		KMSID:         volCtx[ctxKMSID],
		SectorSize:    sectorSize,
		AllowDiscards: discards != nil && *discards,
	}, nil
}

// NodeUnstageVolume undoes NodeStageVolume in reverse order. It is safe to
// repeat, works when any piece is already gone, and answers OK only when no
// engine, loop device or mount of the volume is left.
func (n *NodeServer) NodeUnstageVolume(ctx context.Context, req *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	id, path := req.GetVolumeId(), req.GetStagingTargetPath()
	if err := firstError(required("volume_id", id), required("staging_target_path", path)); err != nil {
		return nil, err
	}
	unlock, err := n.locks.Lock(ctx, id)
	if err != nil {
		return nil, toStatus(err, volumeWhat(id))
	}
	defer unlock()
	image, _ := n.cfg.ImagePath(id) // a deleted volume may still have pieces here
	if err := n.stager.Unstage(klogContext(ctx, "NodeUnstageVolume", id), id, image, path); err != nil {
		return nil, toStatus(err, volumeWhat(id))
	}
	logger(ctx, "NodeUnstageVolume", id).Info("Volume unstaged")
	return &csi.NodeUnstageVolumeResponse{}, nil
}
