package driver

import (
	"context"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// NodeExpandVolume grows a staged volume to the size of its image (which
// ControllerExpandVolume already grew): the engine's data size, the loop
// device's capacity, then the filesystem, online.
func (n *NodeServer) NodeExpandVolume(ctx context.Context, req *csi.NodeExpandVolumeRequest) (*csi.NodeExpandVolumeResponse, error) {
	id, path := req.GetVolumeId(), req.GetVolumePath()
	if err := firstError(required("volume_id", id), required("volume_path", path)); err != nil {
		return nil, err
	}
	if req.GetVolumeCapability() != nil {
		if _, err := parseNodeCapability(req.GetVolumeCapability()); err != nil {
			return nil, err
		}
	}
	v, unlock, err := n.lockStaged(ctx, id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if path != v.StagingPath && !v.HasTarget(path) {
		return nil, status.Errorf(codes.NotFound, "volume %q is not staged or published at %s", id, path)
	}
	size, err := n.stager.Expand(klogContext(ctx, "NodeExpandVolume", id), v, req.GetCapacityRange().GetRequiredBytes())
	if err != nil {
		return nil, toStatus(err, volumeWhat(id))
	}
	logger(ctx, "NodeExpandVolume", id).Info("Volume expanded", "bytes", size)
	return &csi.NodeExpandVolumeResponse{CapacityBytes: size}, nil
}
