package staging

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/csi-encdisk/csi-encdisk/pkg/blockdev"
	"github.com/csi-encdisk/csi-encdisk/pkg/loopdev"
	"github.com/csi-encdisk/csi-encdisk/pkg/mounts"
	"github.com/csi-encdisk/csi-encdisk/pkg/nodestate"
)

// Unstage tears down a staged (or half-staged) volume at stagingPath. A
// volume the node has no state for is torn down from what its run
// directory and staging path show (a lost state file); nothing of it there
// is success. image ("" if unknown) helps find a plain volume's pieces. It
// refuses while publish targets are still mounted.
func (m *Manager) Unstage(ctx context.Context, volumeID, image, stagingPath string) error {
	v, err := m.Load(volumeID)
	if err != nil {
		return err
	}
	if v == nil {
		if v = m.orphan(volumeID, image, stagingPath); v == nil {
			return nil
		}
	}
	if v.StagingPath != stagingPath {
		return fmt.Errorf("%w: volume %q is staged at %s, not %s", ErrStagedElsewhere, volumeID, v.StagingPath, stagingPath)
	}
	var still []string
	for _, t := range v.Targets {
		if mounted, _ := mounts.IsMountPoint(t); mounted {
			still = append(still, t)
		}
	}
	if len(still) > 0 {
		return fmt.Errorf("%w: volume %q is still published at %v; unpublish it first", ErrStillPublished, volumeID, still)
	}
	return m.Teardown(ctx, v)
}

// orphan rebuilds the state of a volume whose state file is gone but whose
// stage may have left pieces, from what proves they are the volume's: its
// run directory (engine, FUSE mount) for an encrypted volume; for a plain
// one, a loop device on its image and that loop device mounted at the
// staging path. nil when nothing of it is there.
func (m *Manager) orphan(volumeID, image, stagingPath string) *nodestate.Volume {
	runDir := m.cfg.Store.RunDir(volumeID)
	if pathExists(runDir) {
		v := &nodestate.Volume{VolumeID: volumeID, Encrypted: true, RunDir: runDir, StagingPath: stagingPath}
		if dev, ino, err := loopdev.BackingOf(blockdev.PlainFile(runDir)); err == nil {
			v.LoopBackingDev, v.LoopBackingInode = dev, ino
		}
		if src, _ := mounts.Source(stagingPath); src != "" && stagingPath != "" {
			if loop, _ := loopdev.FindByBacking(v.LoopBackingDev, v.LoopBackingInode); loop != "" && loop == src {
				v.AccessType = nodestate.AccessMount
			}
		}
		return v
	}
	if image == "" {
		return nil
	}
	dev, ino, err := loopdev.BackingOf(image)
	if err != nil {
		return nil
	}
	loop, _ := loopdev.FindByBacking(dev, ino)
	if loop == "" {
		return nil
	}
	v := &nodestate.Volume{VolumeID: volumeID, Image: image, Loop: loop, LoopBackingDev: dev, LoopBackingInode: ino, StagingPath: stagingPath}
	if src, _ := mounts.Source(stagingPath); stagingPath != "" && src == loop {
		v.AccessType = nodestate.AccessMount
	}
	return v
}

// Teardown removes every piece of a (half) staged volume that still exists,
// in reverse order: the filesystem mount, the loop device, the engine and
// its FUSE mount and run directory, then the state. Each step looks at what
// is there, so it is safe after a crash at any point and safe to repeat. It
// succeeds only when nothing of the stage is left.
func (m *Manager) Teardown(ctx context.Context, v *nodestate.Volume) error {
	if v.AccessType == nodestate.AccessMount && v.StagingPath != "" {
		if err := mounts.Unmount(ctx, v.StagingPath); err != nil {
			return err
		}
	}
	if err := m.detachLoop(ctx, v); err != nil {
		return err
	}
	if servedByEngine(v) && v.RunDir != "" {
		pid := 0
		if v.Engine != nil {
			pid = v.Engine.PID
		}
		if err := m.cfg.Engines.Stop(ctx, v.VolumeID, pid, v.RunDir); err != nil {
			return err
		}
	}
	if err := m.leftovers(v); err != nil {
		return err
	}
	if v.RunDir != "" {
		if err := os.RemoveAll(v.RunDir); err != nil {
			return fmt.Errorf("remove run dir: %w", err)
		}
	}
	return m.cfg.Store.Delete(v.VolumeID)
}

// detachLoop detaches the volume's loop device, if it still is attached.
func (m *Manager) detachLoop(ctx context.Context, v *nodestate.Volume) error {
	dev, reachable := m.loopOf(v)
	switch {
	case dev == "":
		return nil
	case reachable:
		// Checked and cleared on one descriptor: a device number reused for
		// another file since is never detached.
		if err := loopdev.DetachBacked(ctx, dev, v.LoopBackingDev, v.LoopBackingInode); err != nil {
			return fmt.Errorf("detach loop device %s: %w", dev, err)
		}
	default:
		if err := loopdev.Detach(ctx, dev); err != nil {
			return fmt.Errorf("detach loop device %s: %w", dev, err)
		}
	}
	return nil
}

// loopOf finds the volume's loop device by the identity of its backing file
// (never by path text, which differs between mount namespaces). reachable
// is false when the device had to be recognised from the record alone: the
// kernel cannot tell a loop device's backing file once the FUSE server
// behind it died, so the device recorded at attach is taken as the
// volume's when it is bound to such a file and no other volume of this node
// records it. "" when nothing of the volume is attached.
func (m *Manager) loopOf(v *nodestate.Volume) (dev string, reachable bool) {
	if v.LoopBackingDev == 0 && v.LoopBackingInode == 0 {
		return "", true // never got as far as attaching
	}
	if v.Loop != "" && loopdev.BackedBy(v.Loop, v.LoopBackingDev, v.LoopBackingInode) {
		return v.Loop, true
	}
	if found, _ := loopdev.FindByBacking(v.LoopBackingDev, v.LoopBackingInode); found != "" {
		return found, true
	}
	if v.Loop != "" && loopdev.BackingUnreachable(v.Loop) && m.sameAttachment(v) {
		return v.Loop, false
	}
	return "", true
}

// sameAttachment reports whether v's recorded loop device is still the
// attachment v made: the same disk sequence number (recorded since it was
// kept), and no other volume of this node records the device.
func (m *Manager) sameAttachment(v *nodestate.Volume) bool {
	if v.LoopDiskSeq != 0 {
		if seq, err := loopdev.DiskSeq(v.Loop); err != nil || seq != v.LoopDiskSeq {
			return false
		}
	}
	return !m.recordedElsewhere(v)
}

// recordedElsewhere reports whether another volume's state names v's loop
// device.
func (m *Manager) recordedElsewhere(v *nodestate.Volume) bool {
	vols, _ := m.cfg.Store.List()
	for _, o := range vols {
		if o.VolumeID != v.VolumeID && o.Loop == v.Loop {
			return true
		}
	}
	return false
}

// leftovers checks that nothing of the stage is left: no mount at the
// staging path, no loop device on the backing file, no engine, no FUSE mount.
func (m *Manager) leftovers(v *nodestate.Volume) error {
	var left []error
	if v.AccessType == nodestate.AccessMount && v.StagingPath != "" {
		if mounted, _ := mounts.IsMountPoint(v.StagingPath); mounted {
			left = append(left, fmt.Errorf("mount at %s", v.StagingPath))
		}
	}
	if dev, _ := m.loopOf(v); dev != "" {
		left = append(left, fmt.Errorf("loop device %s", dev))
	}
	if servedByEngine(v) && v.RunDir != "" {
		if pid := blockdev.FindEngine(v.RunDir); pid > 0 {
			left = append(left, fmt.Errorf("engine pid %d", pid))
		}
		if mounted, _ := mounts.IsMountPoint(blockdev.FUSEDir(v.RunDir)); mounted {
			left = append(left, fmt.Errorf("FUSE mount %s", blockdev.FUSEDir(v.RunDir)))
		}
	}
	if len(left) > 0 {
		return fmt.Errorf("%w: volume %q: %w", ErrTeardownIncomplete, v.VolumeID, errors.Join(left...))
	}
	return nil
}
