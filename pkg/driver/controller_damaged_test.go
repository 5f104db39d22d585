package driver

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/csi-encdisk/csi-encdisk/pkg/backend"
)

// TestDamagedMetadataFile: a damaged meta.json makes that one volume or
// snapshot unreadable; ListVolumes and ListSnapshots list the others, Get
// and CreateVolume from it are DataLoss naming it, and Delete still
// removes (and crypto-shreds) it.
func TestDamagedMetadataFile(t *testing.T) {
	ctx := context.Background()
	e := newCtlEnv(t, "r1")
	enc := map[string]string{"encrypted": "true"}
	good := e.mustCreate("good", 8<<20, enc, nil)
	bad := e.mustCreate("bad", 8<<20, enc, nil)
	goodSnap := e.snapshot("good-snap", good.VolumeId)
	badSnap := e.snapshot("bad-snap", bad.VolumeId)
	for _, o := range []struct {
		kind backend.Kind
		id   string
	}{{backend.KindVolume, bad.VolumeId}, {backend.KindSnapshot, badSnap.SnapshotId}} {
		dir := "volumes"
		if o.kind == backend.KindSnapshot {
			dir = "snapshots"
		}
		if err := os.WriteFile(filepath.Join(e.pool.Root(), dir, o.id, "meta.json"), []byte(`{"id": "`), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	lv, err := e.ctl.ListVolumes(ctx, &csi.ListVolumesRequest{})
	if err != nil || len(lv.GetEntries()) != 1 || lv.Entries[0].Volume.VolumeId != good.VolumeId {
		t.Fatalf("ListVolumes with one damaged volume: %v, %v", lv, err)
	}
	ls, err := e.ctl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{})
	if err != nil || len(ls.GetEntries()) != 1 || ls.Entries[0].Snapshot.SnapshotId != goodSnap.SnapshotId {
		t.Fatalf("ListSnapshots with one damaged snapshot: %v, %v", ls, err)
	}
	_, err = e.ctl.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: badSnap.SnapshotId})
	wantStatus(t, "GetSnapshot of the damaged one", err, codes.DataLoss, badSnap.SnapshotId, "meta.json")
	_, err = e.create("restore", 0, nil, snapSource(badSnap.SnapshotId))
	wantStatus(t, "restore from the damaged one", err, codes.DataLoss, badSnap.SnapshotId)

	if _, err := e.ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: bad.VolumeId}); err != nil {
		t.Fatalf("DeleteVolume of the damaged volume: %v", err)
	}
	if _, err := e.ctl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: badSnap.SnapshotId}); err != nil {
		t.Fatalf("DeleteSnapshot of the damaged snapshot: %v", err)
	}
	for _, p := range []string{"volumes/" + bad.VolumeId, "snapshots/" + badSnap.SnapshotId} {
		if _, err := os.Stat(filepath.Join(e.pool.Root(), p)); !os.IsNotExist(err) {
			t.Fatalf("%s still in the pool", p)
		}
	}
	e.unlock(backend.KindVolume, good.VolumeId)
	e.unlock(backend.KindSnapshot, goodSnap.SnapshotId)
}
