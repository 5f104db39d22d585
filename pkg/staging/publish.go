package staging

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/csi-encdisk/csi-encdisk/pkg/mounts"
	"github.com/csi-encdisk/csi-encdisk/pkg/nodestate"
)

// PublishRequest is what to publish where.
type PublishRequest struct {
	VolumeID    string
	StagingPath string
	Target      string
	Access      string // must match the stage
	ReadOnly    bool
	// SingleWriter: the volume may be published at one target only.
	SingleWriter bool
}

// Publish bind-mounts the staged filesystem (or, for block access, the loop
// device) at the target, read-only when asked. Publishing again the same way
// is success; another readonly setting at the same target is ErrIncompatible.
func (m *Manager) Publish(ctx context.Context, req PublishRequest) error {
	if err := m.checkPath("target path", req.Target); err != nil {
		return err
	}
	v, err := m.Staged(req.VolumeID)
	if err != nil {
		return err
	}
	switch {
	case v.StagingPath != req.StagingPath:
		return fmt.Errorf("%w: volume %q is staged at %s, not %s", ErrStagedElsewhere, req.VolumeID, v.StagingPath, req.StagingPath)
	case v.AccessType != req.Access:
		return fmt.Errorf("%w: volume %q is staged for %s access, the request asks %s", ErrAccessMismatch, req.VolumeID, v.AccessType, req.Access)
	}
	if req.SingleWriter {
		for _, t := range v.Targets {
			if t != req.Target {
				return fmt.Errorf("%w: volume %q is single-writer and already published at %s", ErrTargetBusy, req.VolumeID, t)
			}
		}
	}
	mounted, err := mounts.IsMountPoint(req.Target)
	if err != nil {
		return err
	}
	if mounted {
		if !v.HasTarget(req.Target) {
			return fmt.Errorf("%w: something else is mounted at %s", ErrTargetBusy, req.Target)
		}
		if ro, err := mounts.ReadOnly(req.Target); err == nil && ro != req.ReadOnly {
			return fmt.Errorf("%w: volume %q is published at %s with readonly %t; this request asks readonly %t", ErrIncompatible, req.VolumeID, req.Target, ro, req.ReadOnly)
		}
		return nil
	}
	source := v.StagingPath
	if v.AccessType == nodestate.AccessBlock {
		source = v.Loop
		if err := os.MkdirAll(filepath.Dir(req.Target), 0o750); err != nil {
			return fmt.Errorf("create the parent of %s: %w", req.Target, err)
		}
		f, err := os.OpenFile(req.Target, os.O_CREATE|os.O_RDONLY, 0o640)
		if err != nil {
			return fmt.Errorf("create target file %s: %w", req.Target, err)
		}
		f.Close()
	} else if err := os.MkdirAll(req.Target, 0o750); err != nil {
		return fmt.Errorf("create target %s: %w", req.Target, err)
	}
	// Record the target before mounting so that a crash in between leaves a
	// record that unpublish and unstage look at.
	v.AddTarget(req.Target)
	if err := m.cfg.Store.Save(v); err != nil {
		return err
	}
	if err := mounts.BindMount(source, req.Target, req.ReadOnly); err != nil {
		v.RemoveTarget(req.Target)
		return errors.Join(err, m.cfg.Store.Save(v))
	}
	return nil
}

// Unpublish unmounts a target this node published for the volume and
// removes the file or directory it made there. A target the node has no
// record of for this volume is left alone, whatever is there: it may be
// another volume's, or not the driver's at all. That is success, as CSI
// asks for a volume that is not published at the target.
func (m *Manager) Unpublish(ctx context.Context, volumeID, target string) error {
	v, err := m.Load(volumeID)
	if err != nil {
		return err
	}
	if v == nil || !v.HasTarget(target) {
		return nil
	}
	if err := mounts.Unmount(ctx, target); err != nil {
		return err
	}
	if err := os.Remove(target); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove target %s: %w", target, err)
	}
	v.RemoveTarget(target)
	return m.cfg.Store.Save(v)
}
