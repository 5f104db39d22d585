package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/blockdev"
	"github.com/csi-encdisk/csi-encdisk/pkg/nodestate"
)

// engineProbeTimeout bounds one health or stats call to an engine.
const engineProbeTimeout = 3 * time.Second

// NodeGetVolumeStats reports bytes and inodes of a staged or published
// volume. (CSI v1.13 moved the volume condition out of this call: see
// NodeGetVolumeHealth.)
func (n *NodeServer) NodeGetVolumeStats(ctx context.Context, req *csi.NodeGetVolumeStatsRequest) (*csi.NodeGetVolumeStatsResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "volume_id is required")
	}
	path := req.GetVolumePath()
	if path == "" {
		return nil, status.Error(codes.InvalidArgument, "volume_path is required")
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

	resp := &csi.NodeGetVolumeStatsResponse{}

	switch v.AccessType {
	case nodestate.AccessBlock:
		size, err := loopSize(v.Loop)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "volume %q: %v", id, err)
		}
		resp.Usage = []*csi.VolumeUsage{{Unit: csi.VolumeUsage_BYTES, Total: size}}
	default:
		var st unix.Statfs_t
		if err := unix.Statfs(path, &st); err != nil {
			return nil, status.Errorf(codes.Internal, "volume %q: statfs %s: %v", id, path, err)
		}
		bsize := int64(st.Bsize)
		resp.Usage = []*csi.VolumeUsage{
			{
				Unit:      csi.VolumeUsage_BYTES,
				Total:     int64(st.Blocks) * bsize,
				Available: int64(st.Bavail) * bsize,
				Used:      int64(st.Blocks-st.Bfree) * bsize,
			},
			{
				Unit:      csi.VolumeUsage_INODES,
				Total:     int64(st.Files),
				Available: int64(st.Ffree),
				Used:      int64(st.Files - st.Ffree),
			},
		}
	}
	return resp, nil
}

// stagedProblem returns "" when every piece of a staged volume is in place,
// else a message that says what is wrong.
func (n *NodeServer) stagedProblem(ctx context.Context, v *nodestate.Volume) string {
	var msgs []string
	for _, e := range n.volumeHealth(ctx, v) {
		msgs = append(msgs, e.GetMessage())
	}
	return strings.Join(msgs, "; ")
}

func healthEntry(t csi.VolumeHealthErrorType, reason, format string, args ...any) *csi.VolumeHealth_VolumeHealthEntry {
	return &csi.VolumeHealth_VolumeHealthEntry{Status: t, Reason: reason, Message: fmt.Sprintf(format, args...)}
}

// volumeHealth checks every piece of a staged volume: the engine process,
// its control socket and I/O error count, the loop device and the mount.
func (n *NodeServer) volumeHealth(ctx context.Context, v *nodestate.Volume) []*csi.VolumeHealth_VolumeHealthEntry {
	var out []*csi.VolumeHealth_VolumeHealthEntry
	if v.Encrypted {
		if e := engineHealth(ctx, v); e != nil {
			out = append(out, e)
		}
	}
	backing := v.Image
	if v.Engine != nil {
		backing = v.Engine.File
	}
	if !loopBackedBy(v.Loop, backing) {
		out = append(out, healthEntry(csi.VolumeHealthErrorType_INACCESSIBLE, "LoopDeviceDetached",
			"loop device %s is no longer attached to %s", v.Loop, backing))
	}
	if v.AccessType == nodestate.AccessMount {
		if mounted, err := isMountPoint(v.StagingPath); err != nil || !mounted {
			out = append(out, healthEntry(csi.VolumeHealthErrorType_INACCESSIBLE, "NotMounted",
				"the filesystem is not mounted at %s", v.StagingPath))
		}
	}
	return out
}

// engineHealth checks an encrypted volume's engine process and control socket.
func engineHealth(ctx context.Context, v *nodestate.Volume) *csi.VolumeHealth_VolumeHealthEntry {
	if v.Engine == nil {
		return healthEntry(csi.VolumeHealthErrorType_INACCESSIBLE, "EngineGone", "the volume has no engine")
	}
	if !isEngineProcess(v.Engine.PID, v.RunDir) {
		return healthEntry(csi.VolumeHealthErrorType_INACCESSIBLE, "EngineGone",
			"the engine (pid %d) is gone: I/O to this volume fails until it is unstaged and staged again", v.Engine.PID)
	}
	pctx, cancel := context.WithTimeout(ctx, engineProbeTimeout)
	defer cancel()
	st, err := blockdev.DialControl(v.Engine.ControlSocket).Stats(pctx)
	if err != nil {
		return healthEntry(csi.VolumeHealthErrorType_INACCESSIBLE, "EngineNotResponding",
			"the engine (pid %d) does not answer on its control socket: %v", v.Engine.PID, err)
	}
	if st.IOErrors > 0 {
		return healthEntry(csi.VolumeHealthErrorType_DEGRADED, "EngineIOErrors",
			"the engine reported %d I/O errors on the image", st.IOErrors)
	}
	return nil
}

// NodeGetVolumeHealth reports the condition of a volume staged on this
// node: INACCESSIBLE when its engine is gone or does not answer, or when its
// loop device or mount is gone; DEGRADED when the engine saw I/O errors.
func (n *NodeServer) NodeGetVolumeHealth(ctx context.Context, req *csi.NodeGetVolumeHealthRequest) (*csi.NodeGetVolumeHealthResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "volume_id is required")
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
	return &csi.NodeGetVolumeHealthResponse{VolumeHealth: &csi.VolumeHealth{
		VolumeId:       id,
		HealthStatuses: n.volumeHealth(ctx, v),
	}}, nil
}

// loopSize reads the size of a loop device in bytes from sysfs.
func loopSize(dev string) (int64, error) {
	if dev == "" {
		return 0, errors.New("no loop device")
	}
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "size"))
	if err != nil {
		return 0, fmt.Errorf("size of %s: %w", dev, err)
	}
	sectors, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("size of %s: %w", dev, err)
	}
	return sectors * 512, nil
}

// NodeExpandVolume grows a staged volume to the size of its image (which
// ControllerExpandVolume already grew): the engine's data size, the loop
// device's capacity, then the filesystem, online.
func (n *NodeServer) NodeExpandVolume(ctx context.Context, req *csi.NodeExpandVolumeRequest) (*csi.NodeExpandVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "volume_id is required")
	}
	if req.GetVolumePath() == "" {
		return nil, status.Error(codes.InvalidArgument, "volume_path is required")
	}
	if req.GetVolumeCapability() != nil {
		if _, err := parseNodeCapability(req.GetVolumeCapability()); err != nil {
			return nil, err
		}
	}
	image, err := n.imagePath(id)
	if err != nil {
		return nil, err
	}
	unlock, err := n.locks.lock(ctx, id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	log := logger(ctx, "NodeExpandVolume", id)

	v, err := n.loadState(id)
	if err != nil {
		return nil, err
	}
	if v == nil || v.Phase != nodestate.PhaseStaged {
		return nil, status.Errorf(codes.NotFound, "volume %q is not staged on this node", id)
	}
	if p := req.GetVolumePath(); p != v.StagingPath && !v.HasTarget(p) {
		return nil, status.Errorf(codes.NotFound, "volume %q is not staged or published at %s", id, p)
	}
	fi, err := os.Stat(image)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "volume %q: %v", id, err)
	}
	dataSize := fi.Size()
	if v.Encrypted {
		if v.Engine == nil {
			return nil, status.Errorf(codes.Internal, "volume %q: staged without an engine", id)
		}
		dataSize -= v.Engine.DataOffset
	}
	if v.SectorSize > 0 {
		dataSize -= dataSize % int64(v.SectorSize)
	}
	if want := req.GetCapacityRange().GetRequiredBytes(); want > dataSize {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %q: the image holds %d bytes, less than the %d asked; expand it through the controller first", id, dataSize, want)
	}
	if v.Encrypted {
		rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err := blockdev.DialControl(v.Engine.ControlSocket).Resize(rctx, dataSize)
		cancel()
		if err != nil {
			return nil, status.Errorf(codes.Internal, "volume %q: resize engine to %d bytes: %v", id, dataSize, err)
		}
	}
	if err := blockdev.LoopSetCapacity(ctx, v.Loop); err != nil {
		return nil, status.Errorf(codes.Internal, "volume %q: loop set-capacity on %s: %v", id, v.Loop, err)
	}
	if v.AccessType == nodestate.AccessMount {
		if err := blockdev.ResizeFilesystem(ctx, v.Loop, v.StagingPath, v.FSType); err != nil {
			if v.FSType != "ext4" || n.publishedAnywhere(v) {
				return nil, status.Errorf(codes.Internal, "volume %q: grow %s filesystem online: %v", id, v.FSType, err)
			}
			// ext4's online resize needs CAP_SYS_RESOURCE, which some node
			// containers lack. Nothing uses the volume yet (kubelet expands
			// between stage and publish), so grow it offline instead.
			log.Info("online ext4 resize refused, growing offline", "error", err.Error())
			if err := n.growExt4Offline(ctx, v); err != nil {
				return nil, status.Errorf(codes.Internal, "volume %q: grow ext4 filesystem offline: %v", id, err)
			}
		}
	}
	log.Info("volume expanded", "bytes", dataSize)
	return &csi.NodeExpandVolumeResponse{CapacityBytes: dataSize}, nil
}

// publishedAnywhere reports whether any publish target of v is mounted.
func (n *NodeServer) publishedAnywhere(v *nodestate.Volume) bool {
	for _, t := range v.Targets {
		if m, _ := isMountPoint(t); m {
			return true
		}
	}
	return false
}

// growExt4Offline unmounts the staged ext4 filesystem, checks it (preen
// mode: only safe fixes), grows it to the device and mounts it again.
func (n *NodeServer) growExt4Offline(ctx context.Context, v *nodestate.Volume) error {
	if err := blockdev.Unmount(ctx, v.StagingPath); err != nil {
		return fmt.Errorf("unmount %s: %w", v.StagingPath, err)
	}
	var errs []error
	if out, err := exec.CommandContext(ctx, "e2fsck", "-f", "-p", v.Loop).CombinedOutput(); err != nil {
		// Exit code 1 means "errors corrected", which is fine.
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() > 1 {
			errs = append(errs, fmt.Errorf("e2fsck -f -p %s: %w: %s", v.Loop, err, strings.TrimSpace(string(out))))
		}
	}
	if len(errs) == 0 {
		if out, err := exec.CommandContext(ctx, "resize2fs", v.Loop).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("resize2fs %s: %w: %s", v.Loop, err, strings.TrimSpace(string(out))))
		}
	}
	opts := slices.Clone(v.MountFlags)
	if v.ReadOnly {
		opts = append(opts, "ro")
	}
	if err := blockdev.Mount(ctx, v.Loop, v.StagingPath, v.FSType, opts); err != nil {
		errs = append(errs, fmt.Errorf("mount %s again at %s: %w", v.Loop, v.StagingPath, err))
	}
	return errors.Join(errs...)
}

// Recover runs once at start. It re-adopts the engines of staged volumes
// that still answer, keeps staged volumes whose engine died while their
// filesystem is still mounted (reported unhealthy until unstaged), and tears
// down stages that never finished or whose pieces are all gone. A volume
// that cannot be cleaned up keeps its state (unstage or the next start
// retries) and is only logged: one stuck volume must not keep the node
// plugin from serving the others. The error is for an unreadable state
// directory.
func (n *NodeServer) Recover(ctx context.Context) error {
	base := klog.FromContext(ctx)
	vols, err := n.state.List()
	if err != nil {
		if vols == nil {
			return fmt.Errorf("node recovery: %w", err)
		}
		base.Error(err, "some node state files cannot be read; their volumes are left as they are")
	}
	for _, v := range vols {
		log := base.WithValues("op", "Recover", "volumeID", v.VolumeID)
		unlock, err := n.locks.lock(ctx, v.VolumeID)
		if err != nil {
			return err
		}
		keep, why := n.recoverOne(ctx, v)
		if keep {
			log.Info("re-adopted staged volume", "state", why, "loop", v.Loop)
		} else {
			log.Info("tearing down volume left behind", "reason", why)
			if err := n.teardown(ctx, v); err != nil {
				log.Error(err, "teardown incomplete; the state is kept and unstage or the next start retries")
			}
		}
		unlock()
	}
	return nil
}

// recoverOne decides whether a volume found in the state is kept.
func (n *NodeServer) recoverOne(ctx context.Context, v *nodestate.Volume) (keep bool, why string) {
	if v.Phase != nodestate.PhaseStaged {
		return false, "the stage never finished"
	}
	problem := n.stagedProblem(ctx, v)
	if problem == "" {
		return true, "healthy"
	}
	inUse := false
	if v.AccessType == nodestate.AccessMount {
		if m, _ := isMountPoint(v.StagingPath); m {
			inUse = true
		}
	}
	for _, t := range v.Targets {
		if m, _ := isMountPoint(t); m {
			inUse = true
		}
	}
	if inUse {
		return true, "abnormal, still mounted: " + problem
	}
	return false, "abnormal and not mounted: " + problem
}

// lockStaged takes the volume's lock and returns its state, or NotFound when
// the volume is unknown or not staged on this node. The caller must call
// unlock when err is nil.
func (n *NodeServer) lockStaged(ctx context.Context, id string) (v *nodestate.Volume, unlock func(), err error) {
	if _, err := n.imagePath(id); err != nil {
		return nil, nil, err
	}
	unlock, err = n.locks.lock(ctx, id)
	if err != nil {
		return nil, nil, err
	}
	v, err = n.loadState(id)
	if err == nil && (v == nil || v.Phase != nodestate.PhaseStaged) {
		err = status.Errorf(codes.NotFound, "volume %q is not staged on this node", id)
	}
	if err != nil {
		unlock()
		return nil, nil, err
	}
	return v, unlock, nil
}
