package driver

import (
	"context"
	"os"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/csi-encdisk/csi-encdisk/pkg/backend"
	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
	"github.com/csi-encdisk/csi-encdisk/pkg/imagelock"
)

// TestDeleteInUse: while something holds a volume's writer lock (an engine,
// a node's loop device, `volume open`), DeleteVolume is FailedPrecondition
// "volume in use" and the image, header included, is untouched; once the
// holder lets go, the delete works. Online expansion and snapshots of a
// live volume stay allowed.
func TestDeleteInUse(t *testing.T) {
	e := newCtlEnv(t, "r1")
	for _, enc := range []string{"true", "false"} {
		v := e.mustCreate("busy-"+enc, 8<<20, map[string]string{"encrypted": enc}, nil)
		path, err := e.pool.ImagePath(v.VolumeId)
		if err != nil {
			t.Fatal(err)
		}
		holder, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		if err := imagelock.Lock(holder, imagelock.Write, imagelock.Holder("engine", v.VolumeId)); err != nil {
			t.Fatal(err)
		}
		_, err = e.ctl.DeleteVolume(context.Background(), &csi.DeleteVolumeRequest{VolumeId: v.VolumeId})
		wantStatus(t, "DeleteVolume of a locked "+enc+" volume", err, codes.FailedPrecondition, "volume in use", v.VolumeId)
		if _, err := e.pool.Get(context.Background(), backend.KindVolume, v.VolumeId); err != nil {
			t.Fatalf("volume gone after a refused delete: %v", err)
		}
		if enc == "true" {
			if _, err := crypt.ReadHeader(holder); err != nil {
				t.Fatalf("header damaged by a refused delete: %v", err)
			}
		}
		// Allowed on a live volume: online expansion, snapshots.
		if _, err := e.ctl.ControllerExpandVolume(context.Background(), &csi.ControllerExpandVolumeRequest{
			VolumeId: v.VolumeId, CapacityRange: &csi.CapacityRange{RequiredBytes: 16 << 20}}); err != nil {
			t.Fatalf("online ControllerExpandVolume: %v", err)
		}
		e.snapshot("busy-snap-"+enc, v.VolumeId)
		holder.Close()
		if _, err := e.ctl.DeleteVolume(context.Background(), &csi.DeleteVolumeRequest{VolumeId: v.VolumeId}); err != nil {
			t.Fatalf("DeleteVolume after the holder closed: %v", err)
		}
	}
}

// TestContentSourceInContext: a restored or cloned volume tells the node
// (volume context "contentSource") that its data came from elsewhere, so
// the node never formats it; a new empty volume says nothing.
func TestContentSourceInContext(t *testing.T) {
	e := newCtlEnv(t, "r1")
	for _, enc := range []string{"true", "false"} {
		src := e.mustCreate("src-"+enc, 8<<20, map[string]string{"encrypted": enc}, nil)
		if cs, ok := src.VolumeContext["contentSource"]; ok {
			t.Fatalf("new volume has contentSource %q", cs)
		}
		snap := e.snapshot("snap-"+enc, src.VolumeId)
		restored := e.mustCreate("restored-"+enc, 8<<20, nil, snapSource(snap.SnapshotId))
		clone := e.mustCreate("clone-"+enc, 8<<20, nil, volSource(src.VolumeId))
		if got := restored.VolumeContext["contentSource"]; got != "snapshot" {
			t.Fatalf("restored volume: contentSource %q, want snapshot", got)
		}
		if got := clone.VolumeContext["contentSource"]; got != "volume" {
			t.Fatalf("clone: contentSource %q, want volume", got)
		}
	}
}
