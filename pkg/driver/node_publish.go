package driver

import (
	"context"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/csi-encdisk/csi-encdisk/pkg/staging"
)

// NodePublishVolume bind-mounts the staged filesystem (or, for raw block,
// the loop device) at the target path; read-only when asked.
func (n *NodeServer) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	id, target, staged := req.GetVolumeId(), req.GetTargetPath(), req.GetStagingTargetPath()
	if err := firstError(required("volume_id", id), absolutePath("target_path", target),
		absolutePath("staging_target_path", staged)); err != nil {
		return nil, err
	}
	vc, err := parseNodeCapability(req.GetVolumeCapability())
	if err != nil {
		return nil, err
	}
	_, unlock, err := n.lockVolume(ctx, id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	preq := staging.PublishRequest{
		VolumeID:     id,
		StagingPath:  staged,
		Target:       target,
		Access:       vc.access,
		ReadOnly:     req.GetReadonly() || vc.readOnly,
		SingleWriter: vc.mode == csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER,
	}
	if err := n.stager.Publish(ctx, preq); err != nil {
		return nil, toStatus(err, volumeWhat(id))
	}
	logger(ctx, "NodePublishVolume", id).Info("Volume published", "target", target, "readOnly", preq.ReadOnly)
	return &csi.NodePublishVolumeResponse{}, nil
}

// NodeUnpublishVolume unmounts a target this node published for the volume
// and removes what the publish made there. It is safe to repeat, and it
// leaves alone a target the node did not publish for this volume.
func (n *NodeServer) NodeUnpublishVolume(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	id, target := req.GetVolumeId(), req.GetTargetPath()
	if err := firstError(required("volume_id", id), required("target_path", target)); err != nil {
		return nil, err
	}
	unlock, err := n.locks.Lock(ctx, id)
	if err != nil {
		return nil, toStatus(err, volumeWhat(id))
	}
	defer unlock()
	if err := n.stager.Unpublish(ctx, id, target); err != nil {
		return nil, toStatus(err, volumeWhat(id))
	}
	logger(ctx, "NodeUnpublishVolume", id).Info("Volume unpublished", "target", target)
	return &csi.NodeUnpublishVolumeResponse{}, nil
}
