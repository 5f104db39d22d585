package driver

import (
	"context"
	"errors"
	"os"
	"path/filepath"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-encdisk/csi-encdisk/pkg/nodestate"
)

// NodePublishVolume bind-mounts the staged filesystem (or, for raw block,
// the loop device) at the target path; read-only when asked.
func (n *NodeServer) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "volume_id is required")
	}
	target := req.GetTargetPath()
	if target == "" {
		return nil, status.Error(codes.InvalidArgument, "target_path is required")
	}
	if !filepath.IsAbs(target) {
		return nil, status.Errorf(codes.InvalidArgument, "target_path %q must be an absolute path", target)
	}
	vc, err := parseNodeCapability(req.GetVolumeCapability())
	if err != nil {
		return nil, err
	}
	staging := req.GetStagingTargetPath()
	if staging == "" {
		return nil, status.Error(codes.InvalidArgument, "staging_target_path is required (this driver stages volumes)")
	}
	if _, err := n.imagePath(id); err != nil {
		return nil, err
	}
	unlock, err := n.locks.lock(ctx, id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	log := logger(ctx, "NodePublishVolume", id)

	v, err := n.loadState(id)
	if err != nil {
		return nil, err
	}
	if v == nil || v.Phase != nodestate.PhaseStaged {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %q is not staged on this node", id)
	}
	if v.StagingPath != staging {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %q is staged at %s, not %s", id, v.StagingPath, staging)
	}
	if v.AccessType != vc.access {
		return nil, status.Errorf(codes.InvalidArgument, "volume %q is staged for %s access, the capability asks %s", id, v.AccessType, vc.access)
	}
	readOnly := req.GetReadonly() || vc.readOnly
	if vc.mode == csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER {
		for _, t := range v.Targets {
			if t != target {
				return nil, status.Errorf(codes.FailedPrecondition, "volume %q has access mode SINGLE_NODE_SINGLE_WRITER and is already published at %s", id, t)
			}
		}
	}

	mounted, err := isMountPoint(target)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, status.Errorf(codes.Internal, "volume %q: check target %s: %v", id, target, err)
	}
	if mounted {
		if v.HasTarget(target) {
			if ro, err := mountIsReadOnly(target); err == nil && ro != readOnly {
				return nil, status.Errorf(codes.AlreadyExists, "volume %q is already published at %s with readonly %t; this request asks for readonly %t", id, target, ro, readOnly)
			}
			log.V(2).Info("volume already published", "target", target)
			return &csi.NodePublishVolumeResponse{}, nil
		}
		return nil, status.Errorf(codes.FailedPrecondition, "target %s already has something else mounted", target)
	}

	var source string
	switch v.AccessType {
	case nodestate.AccessBlock:
		if v.Loop == "" {
			return nil, status.Errorf(codes.Internal, "volume %q: staged without a loop device", id)
		}
		source = v.Loop
		if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
			return nil, status.Errorf(codes.Internal, "volume %q: create parent of %s: %v", id, target, err)
		}
		f, err := os.OpenFile(target, os.O_CREATE|os.O_RDONLY, 0o640)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "volume %q: create target file %s: %v", id, target, err)
		}
		f.Close()
	default:
		source = v.StagingPath
		if err := os.MkdirAll(target, 0o750); err != nil {
			return nil, status.Errorf(codes.Internal, "volume %q: create target %s: %v", id, target, err)
		}
	}
	// Record the target before mounting so a crash in between leaves a
	// record that unstage checks.
	v.AddTarget(target)
	if err := n.state.Save(v); err != nil {
		return nil, status.Errorf(codes.Internal, "volume %q: %v", id, err)
	}
	if err := bindMount(source, target, readOnly); err != nil {
		v.RemoveTarget(target)
		_ = n.state.Save(v)
		return nil, status.Errorf(codes.Internal, "volume %q: bind mount %s at %s: %v", id, source, target, err)
	}
	log.Info("volume published", "target", target, "readOnly", readOnly)
	return &csi.NodePublishVolumeResponse{}, nil
}

// NodeUnpublishVolume unmounts the target and removes the file or directory
// the publish created. It is safe to repeat.
func (n *NodeServer) NodeUnpublishVolume(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "volume_id is required")
	}
	target := req.GetTargetPath()
	if target == "" {
		return nil, status.Error(codes.InvalidArgument, "target_path is required")
	}
	unlock, err := n.locks.lock(ctx, id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	log := logger(ctx, "NodeUnpublishVolume", id)

	if err := unmountIfMounted(ctx, target); err != nil {
		return nil, status.Errorf(codes.Internal, "volume %q: %v", id, err)
	}
	if err := os.Remove(target); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, status.Errorf(codes.Internal, "volume %q: remove target %s: %v", id, target, err)
	}
	v, err := n.loadState(id)
	if err != nil {
		return nil, err
	}
	if v != nil && v.HasTarget(target) {
		v.RemoveTarget(target)
		if err := n.state.Save(v); err != nil {
			return nil, status.Errorf(codes.Internal, "volume %q: %v", id, err)
		}
	}
	log.Info("volume unpublished", "target", target)
	return &csi.NodeUnpublishVolumeResponse{}, nil
}
