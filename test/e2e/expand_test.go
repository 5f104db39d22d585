package e2e

import (
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
)

func fsSize(t *testing.T, path string) int64 {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		t.Fatalf("statfs %s: %v", path, err)
	}
	return int64(st.Blocks) * int64(st.Bsize)
}

// TestExpandOnline grows a published encrypted XFS volume through
// ControllerExpandVolume and NodeExpandVolume while it stays mounted. (XFS:
// ext4's online resize needs CAP_SYS_RESOURCE, which this machine's
// containers lack; XFS needs at least 300 MB.)
func TestExpandOnline(t *testing.T) {
	dir := workDir(t)
	d := startDriver(t, dir)
	v := d.createVolume(t, "grow", 320*mib, "xfs", map[string]string{"encrypted": "true"}, "")
	d.stageAndPublish(t, v)
	marker := newMarker(t)
	writeMarker(t, v.TargetPath, marker)
	before := fsSize(t, v.TargetPath)

	const newSize = 512 * mib
	cresp, err := d.ctrl.ControllerExpandVolume(ctxT(t), &csi.ControllerExpandVolumeRequest{
		VolumeId: v.id(), CapacityRange: &csi.CapacityRange{RequiredBytes: newSize}})
	if err != nil {
		t.Fatalf("ControllerExpandVolume: %v", err)
	}
	if cresp.GetCapacityBytes() < newSize {
		t.Fatalf("ControllerExpandVolume gave %d bytes, want >= %d", cresp.GetCapacityBytes(), newSize)
	}
	nresp, err := d.node.NodeExpandVolume(ctxT(t), &csi.NodeExpandVolumeRequest{
		VolumeId: v.id(), VolumePath: v.TargetPath, VolumeCapability: v.Capability,
		CapacityRange: &csi.CapacityRange{RequiredBytes: newSize}, StagingTargetPath: v.StagingPath})
	if err != nil {
		t.Fatalf("NodeExpandVolume: %v\nlog:\n%s", err, d.logTail())
	}
	if nresp.GetCapacityBytes() < newSize {
		t.Fatalf("NodeExpandVolume reports %d bytes, want >= %d", nresp.GetCapacityBytes(), newSize)
	}
	after := fsSize(t, v.TargetPath)
	if after < before*3/2 {
		t.Fatalf("filesystem did not grow online: %d -> %d bytes", before, after)
	}
	t.Logf("filesystem grew online from %d to %d bytes", before, after)
	readMarker(t, v.TargetPath, marker)

	// The grown volume still stages from scratch with the new size.
	d.unpublish(t, v)
	d.unstage(t, v)
	d.stageAndPublish(t, v)
	readMarker(t, v.TargetPath, marker)
	if got := fsSize(t, v.TargetPath); got != after {
		t.Fatalf("filesystem size after restage %d, want %d", got, after)
	}
}
