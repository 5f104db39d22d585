package driver

import (
	"context"
	"errors"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/backend"
)

// CreateSnapshot copies a volume's image, header included: an encrypted
// snapshot keeps the volume's key and its own copy of the wrapped
// passphrase. It is idempotent by name.
func (c *ControllerServer) CreateSnapshot(ctx context.Context, req *csi.CreateSnapshotRequest) (*csi.CreateSnapshotResponse, error) {
	name, srcID := req.GetName(), req.GetSourceVolumeId()
	if name == "" {
		return nil, invalid("name: must not be empty")
	}
	if srcID == "" {
		return nil, invalid("source_volume_id: must not be empty")
	}
	for k := range req.GetParameters() {
		// csi-snapshotter --extra-create-metadata adds
		// csi.storage.k8s.io/volumesnapshot/{name,namespace} and
		// .../volumesnapshotcontent/name: metadata, not parameters.
		if strings.HasPrefix(k, reservedPrefix) {
			continue
		}
		return nil, invalid("unknown snapshot parameter %q (snapshots take no parameters besides csi.storage.k8s.io/* metadata)", k)
	}
	// A snapshot lives in its volume's pool.
	pool, err := c.pool.byID(srcID)
	if err != nil {
		return nil, toStatus(err, "CreateSnapshot")
	}
	unlock, err := c.pool.Lock(ctx, backend.KindSnapshot, name)
	if err != nil {
		return nil, toStatus(err, "CreateSnapshot")
	}
	defer unlock()
	if old, err := pool.Get(ctx, backend.KindSnapshot, pool.ID(backend.KindSnapshot, name)); err == nil {
		if old.SourceVolumeID != srcID {
			return nil, status.Errorf(codes.AlreadyExists, "snapshot %q exists for volume %q, not %q", name, old.SourceVolumeID, srcID)
		}
		return &csi.CreateSnapshotResponse{Snapshot: csiSnapshot(old)}, nil
	} else if !errors.Is(err, backend.ErrNotFound) {
		return nil, toStatus(err, "CreateSnapshot")
	}
	vol, err := c.pool.Get(ctx, backend.KindVolume, srcID)
	if errors.Is(err, backend.ErrNotFound) {
		return nil, status.Errorf(codes.NotFound, "source volume %q does not exist", srcID)
	}
	if err != nil {
		return nil, toStatus(err, "CreateSnapshot")
	}
	// Hold the volume while copying it, so a concurrent DeleteVolume cannot
	// shred its header under the copy (lock order: snapshot, then volume).
	unlockVol, err := c.pool.Lock(ctx, backend.KindVolume, vol.Name)
	if err != nil {
		return nil, toStatus(err, "CreateSnapshot")
	}
	defer unlockVol()
	m, err := c.pool.Create(ctx, backend.CreateRequest{
		Meta: backend.Meta{
			Name:           name,
			Kind:           backend.KindSnapshot,
			Size:           vol.Size,
			SourceVolumeID: vol.ID,
			Encrypted:      vol.Encrypted,
			KMSID:          vol.KMSID,
			SectorSize:     vol.SectorSize,
			AllowDiscards:  vol.AllowDiscards,
			Region:         vol.Region,
		},
		Source: vol,
	})
	if err != nil {
		return nil, toStatus(err, "CreateSnapshot "+name)
	}
	klog.FromContext(ctx).Info("Created snapshot", "name", name, "snapshotID", m.ID, "sourceVolume", vol.ID, "encrypted", m.Encrypted)
	return &csi.CreateSnapshotResponse{Snapshot: csiSnapshot(m)}, nil
}

// DeleteSnapshot crypto-shreds an encrypted snapshot's header copy and
// removes it; an unknown ID is success.
func (c *ControllerServer) DeleteSnapshot(ctx context.Context, req *csi.DeleteSnapshotRequest) (*csi.DeleteSnapshotResponse, error) {
	id := req.GetSnapshotId()
	if id == "" {
		return nil, invalid("snapshot_id: must not be empty")
	}
	m, err := c.pool.Get(ctx, backend.KindSnapshot, id)
	if errors.Is(err, backend.ErrNotFound) {
		return &csi.DeleteSnapshotResponse{}, nil
	}
	if errors.Is(err, backend.ErrCorrupt) {
		if err := c.deleteDamaged(ctx, backend.KindSnapshot, id, err); err != nil {
			return nil, err
		}
		return &csi.DeleteSnapshotResponse{}, nil
	}
	if err != nil {
		return nil, toStatus(err, "DeleteSnapshot")
	}
	unlock, err := c.pool.Lock(ctx, backend.KindSnapshot, m.Name)
	if err != nil {
		return nil, toStatus(err, "DeleteSnapshot")
	}
	defer unlock()
	if err := c.pool.Delete(ctx, backend.KindSnapshot, id, shredder(m)); err != nil {
		return nil, toStatus(err, "DeleteSnapshot "+id)
	}
	klog.FromContext(ctx).Info("Deleted snapshot", "snapshotID", id, "name", m.Name)
	return &csi.DeleteSnapshotResponse{}, nil
}

// ListSnapshots lists snapshots, all or by ID or by source volume, in pages.
func (c *ControllerServer) ListSnapshots(ctx context.Context, req *csi.ListSnapshotsRequest) (*csi.ListSnapshotsResponse, error) {
	var all []*backend.Meta
	switch id := req.GetSnapshotId(); {
	case id != "":
		m, err := c.pool.Get(ctx, backend.KindSnapshot, id)
		if errors.Is(err, backend.ErrNotFound) {
			return &csi.ListSnapshotsResponse{}, nil
		}
		if err != nil {
			return nil, toStatus(err, "ListSnapshots")
		}
		all = []*backend.Meta{m}
	default:
		var err error
		if all, err = c.pool.List(ctx, backend.KindSnapshot); err != nil {
			return nil, toStatus(err, "ListSnapshots")
		}
	}
	if src := req.GetSourceVolumeId(); src != "" {
		kept := all[:0:0]
		for _, m := range all {
			if m.SourceVolumeID == src {
				kept = append(kept, m)
			}
		}
		all = kept
	}
	page, next, err := paginate(all, backend.KindSnapshot, req.GetStartingToken(), req.GetMaxEntries())
	if err != nil {
		return nil, err
	}
	resp := &csi.ListSnapshotsResponse{NextToken: next}
	for _, m := range page {
		resp.Entries = append(resp.Entries, &csi.ListSnapshotsResponse_Entry{Snapshot: csiSnapshot(m)})
	}
	return resp, nil
}

// GetSnapshot describes one snapshot; an unknown ID is NotFound.
func (c *ControllerServer) GetSnapshot(ctx context.Context, req *csi.GetSnapshotRequest) (*csi.GetSnapshotResponse, error) {
	id := req.GetSnapshotId()
	if id == "" {
		return nil, invalid("snapshot_id: must not be empty")
	}
	m, err := c.pool.Get(ctx, backend.KindSnapshot, id)
	if errors.Is(err, backend.ErrNotFound) {
		return nil, status.Errorf(codes.NotFound, "snapshot %q does not exist", id)
	}
	if err != nil {
		return nil, toStatus(err, "GetSnapshot")
	}
	return &csi.GetSnapshotResponse{Snapshot: csiSnapshot(m)}, nil
}
