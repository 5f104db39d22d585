package driver

import (
	"context"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-encdisk/csi-encdisk/pkg/staging"
)

// NodeGetVolumeHealth reports the condition of a volume staged on this
// node: INACCESSIBLE when its engine is gone or does not answer, or when its
// loop device or mount is gone; DEGRADED when the engine saw I/O errors.
func (n *NodeServer) NodeGetVolumeHealth(ctx context.Context, req *csi.NodeGetVolumeHealthRequest) (*csi.NodeGetVolumeHealthResponse, error) {
	id := req.GetVolumeId()
	if err := required("volume_id", id); err != nil {
		return nil, err
	}
	v, unlock, err := n.lockStaged(ctx, id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if p := req.GetStagingTargetPath(); p != "" && p != v.StagingPath {
		return nil, status.Errorf(codes.NotFound, "volume %q is not staged at %s", id, p)
	}
	if p := req.GetVolumePublishPath(); p != "" && !v.HasTarget(p) {
		return nil, status.Errorf(codes.NotFound, "volume %q is not published at %s", id, p)
	}
	var entries []*csi.VolumeHealth_VolumeHealthEntry
	for _, p := range n.stager.Health(ctx, v) {
		t := csi.VolumeHealthErrorType_INACCESSIBLE
		if p.Condition == staging.Degraded {
			t = csi.VolumeHealthErrorType_DEGRADED
		}
		entries = append(entries, &csi.VolumeHealth_VolumeHealthEntry{Status: t, Reason: p.Reason, Message: p.Message})
	}
	return &csi.NodeGetVolumeHealthResponse{VolumeHealth: &csi.VolumeHealth{VolumeId: id, HealthStatuses: entries}}, nil
}
