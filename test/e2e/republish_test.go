package e2e

import (
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestRepublishIncompatible: publishing again at the same target is
// idempotent when it asks for the same thing, and AlreadyExists when it asks
// for read-only over a read-write publication (CSI NodePublishVolume).
func TestRepublishIncompatible(t *testing.T) {
	dir := workDir(t)
	d := startDriver(t, dir)
	v := d.createVolume(t, "republish", 32*mib, "ext4", map[string]string{"encrypted": "true"}, "")
	d.stageAndPublish(t, v)
	d.publish(t, v) // same request again: OK
	_, err := d.node.NodePublishVolume(ctxT(t), &csi.NodePublishVolumeRequest{
		VolumeId: v.id(), StagingTargetPath: v.StagingPath, TargetPath: v.TargetPath,
		VolumeCapability: v.Capability, VolumeContext: v.Volume.GetVolumeContext(), Readonly: true,
	})
	if status.Code(err) != codes.AlreadyExists {
		t.Fatalf("read-only publish over a read-write one: %v, want AlreadyExists", err)
	}
	d.unpublish(t, v)
	d.unstage(t, v)
}
