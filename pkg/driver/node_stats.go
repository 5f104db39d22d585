package driver

import (
	"context"
	"os"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// NodeGetVolumeStats reports bytes and inodes of a staged or published
// volume. (CSI v1.13 moved the volume condition out of this call: see
// NodeGetVolumeHealth.)
func (n *NodeServer) NodeGetVolumeStats(ctx context.Context, req *csi.NodeGetVolumeStatsRequest) (*csi.NodeGetVolumeStatsResponse, error) {
	id, path := req.GetVolumeId(), req.GetVolumePath()
	if err := firstError(required("volume_id", id), required("volume_path", path)); err != nil {
		return nil, err
	}
	v, unlock, err := n.lockStaged(ctx, id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if path != v.StagingPath && !v.HasTarget(path) {
		return nil, status.Errorf(codes.NotFound, "volume %q is not staged or published at %s", id, path)
	}
	if _, err := os.Lstat(path); err != nil {
		return nil, status.Errorf(codes.NotFound, "volume %q: volume path %s: %v", id, path, err)
	}
	u, err := n.stager.Usage(v, path)
	if err != nil {
		return nil, toStatus(err, volumeWhat(id))
	}
	if u.Block {
		return &csi.NodeGetVolumeStatsResponse{Usage: []*csi.VolumeUsage{{Unit: csi.VolumeUsage_BYTES, Total: u.TotalBytes}}}, nil
	}
	return &csi.NodeGetVolumeStatsResponse{Usage: []*csi.VolumeUsage{
		{Unit: csi.VolumeUsage_BYTES, Total: u.TotalBytes, Available: u.AvailableBytes, Used: u.UsedBytes},
		{Unit: csi.VolumeUsage_INODES, Total: u.TotalInodes, Available: u.FreeInodes, Used: u.UsedInodes},
	}}, nil
}
