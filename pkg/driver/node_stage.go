package driver

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-encdisk/csi-encdisk/pkg/blockdev"
	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
	"github.com/csi-encdisk/csi-encdisk/pkg/kmsclient"
	"github.com/csi-encdisk/csi-encdisk/pkg/nodestate"
)

// engineStopTimeout bounds a graceful engine shutdown before it is killed.
const engineStopTimeout = 15 * time.Second

// NodeStageVolume unlocks an encrypted volume (or takes a plain one as it
// is), attaches a loop device, and for mount access makes a filesystem if
// the volume has none and mounts it at the staging path.
func (n *NodeServer) NodeStageVolume(ctx context.Context, req *csi.NodeStageVolumeRequest) (*csi.NodeStageVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "volume_id is required")
	}
	staging := req.GetStagingTargetPath()
	if staging == "" {
		return nil, status.Error(codes.InvalidArgument, "staging_target_path is required")
	}
	if !filepath.IsAbs(staging) {
		return nil, status.Errorf(codes.InvalidArgument, "staging_target_path %q must be an absolute path", staging)
	}
	vc, err := parseNodeCapability(req.GetVolumeCapability())
	if err != nil {
		return nil, err
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
	log := logger(ctx, "NodeStageVolume", id)

	old, err := n.loadState(id)
	if err != nil {
		return nil, err
	}
	if old != nil {
		if old.Phase == nodestate.PhaseStaged {
			if old.StagingPath != staging {
				return nil, status.Errorf(codes.FailedPrecondition, "volume %q is already staged at %s, not %s", id, old.StagingPath, staging)
			}
			if old.AccessType != vc.access || (vc.fsType != "" && old.FSType != vc.fsType) || old.ReadOnly != vc.readOnly {
				return nil, status.Errorf(codes.AlreadyExists, "volume %q is already staged at %s with an incompatible capability (%s %s, read-only %t)", id, staging, old.AccessType, old.FSType, old.ReadOnly)
			}
			problem := n.stagedProblem(ctx, old)
			if problem == "" {
				log.V(2).Info("volume already staged")
				return &csi.NodeStageVolumeResponse{}, nil
			}
			log.Info("staged volume is broken, staging again", "problem", problem)
		}
		if len(old.Targets) > 0 {
			return nil, status.Errorf(codes.FailedPrecondition, "volume %q is still published at %s and cannot be staged again", id, strings.Join(old.Targets, ", "))
		}
		if err := n.teardown(ctx, old); err != nil {
			return nil, status.Errorf(codes.Internal, "volume %q: clean up the earlier stage: %v", id, err)
		}
	}

	encrypted, err := isEncrypted(req.GetVolumeContext(), image)
	if err != nil {
		return nil, err
	}
	v := &nodestate.Volume{
		VolumeID:    id,
		Phase:       nodestate.PhaseStaging,
		Encrypted:   encrypted,
		Image:       image,
		StagingPath: staging,
		AccessType:  vc.access,
		FSType:      vc.fsType,
		MountFlags:  vc.mountFlags,
		ReadOnly:    vc.readOnly,
		RunDir:      n.state.RunDir(id),
	}
	if err := n.state.Save(v); err != nil {
		return nil, status.Errorf(codes.Internal, "volume %q: %v", id, err)
	}
	if err := n.stage(ctx, v, req.GetVolumeContext()); err != nil {
		log.Error(err, "stage failed, undoing")
		if terr := n.teardown(context.WithoutCancel(ctx), v); terr != nil {
			log.Error(terr, "undo of a failed stage was incomplete; it is retried on the next stage or at restart")
		}
		return nil, err
	}
	v.Phase = nodestate.PhaseStaged
	if err := n.state.Save(v); err != nil {
		return nil, status.Errorf(codes.Internal, "volume %q: %v", id, err)
	}
	log.Info("volume staged", "encrypted", v.Encrypted, "access", v.AccessType, "fsType", v.FSType, "loop", v.Loop, "stagingPath", staging)
	return &csi.NodeStageVolumeResponse{}, nil
}

// isEncrypted decides how to open a volume: the volume context's
// "encrypted" when CreateVolume set it, else whether the image starts with
// a LUKS2 header (statically provisioned volumes).
func isEncrypted(volCtx map[string]string, image string) (bool, error) {
	if s, ok := volCtx[ctxEncrypted]; ok {
		b, err := strconv.ParseBool(s)
		if err != nil {
			return false, status.Errorf(codes.InvalidArgument, "volume_context.encrypted %q: accepts \"true\" or \"false\"", s)
		}
		return b, nil
	}
	f, err := os.Open(image)
	if err != nil {
		return false, status.Errorf(codes.Internal, "open image %s: %v", image, err)
	}
	defer f.Close()
	_, err = crypt.ReadHeader(f)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, crypt.ErrNotLUKS2):
		return false, nil
	default:
		return false, status.Errorf(codes.FailedPrecondition, "image %s: %v", image, err)
	}
}

// stage builds the pieces of a staged volume, saving the state after each
// so that a crash or a failure can undo exactly what exists.
func (n *NodeServer) stage(ctx context.Context, v *nodestate.Volume, volCtx map[string]string) error {
	backing := v.Image
	if v.Encrypted {
		eng, sectorSize, err := n.startEngine(ctx, v, volCtx)
		if err != nil {
			return err
		}
		v.Engine = eng
		v.SectorSize = sectorSize
		backing = eng.File
		if err := n.state.Save(v); err != nil {
			return status.Errorf(codes.Internal, "volume %q: %v", v.VolumeID, err)
		}
	} else {
		ss, err := sectorSizeFromContext(volCtx)
		if err != nil {
			return err
		}
		v.SectorSize = ss
	}

	// A read-only raw block volume gets a read-only loop device: a read-only
	// bind mount does not stop writes through a device node. (A read-only
	// filesystem stays on a writable loop device so its journal can replay.)
	roLoop := v.ReadOnly && v.AccessType == nodestate.AccessBlock
	dev, err := blockdev.LoopAttach(ctx, backing, v.SectorSize, roLoop)
	if err != nil {
		return status.Errorf(codes.Internal, "volume %q: attach loop device: %v", v.VolumeID, err)
	}
	v.Loop = dev
	if err := n.state.Save(v); err != nil {
		return status.Errorf(codes.Internal, "volume %q: %v", v.VolumeID, err)
	}
	if v.AccessType == nodestate.AccessBlock {
		return nil
	}

	found, err := blockdev.DetectFilesystem(ctx, dev)
	if err != nil {
		return status.Errorf(codes.Internal, "volume %q: detect filesystem on %s: %v", v.VolumeID, dev, err)
	}
	fsType := v.FSType
	switch {
	case found == "" && v.ReadOnly:
		return status.Errorf(codes.FailedPrecondition, "volume %q has no filesystem and its access mode is read-only", v.VolumeID)
	case found == "":
		if fsType == "" {
			fsType = defaultFSType
		}
		if err := blockdev.MakeFilesystem(ctx, dev, fsType); err != nil {
			return status.Errorf(codes.Internal, "volume %q: make %s filesystem: %v", v.VolumeID, fsType, err)
		}
	case fsType == "":
		fsType = found
	case found != fsType:
		return status.Errorf(codes.FailedPrecondition, "volume %q already holds a %s filesystem, not %s; it is never formatted over", v.VolumeID, found, fsType)
	}
	v.FSType = fsType
	if err := os.MkdirAll(v.StagingPath, 0o750); err != nil {
		return status.Errorf(codes.Internal, "volume %q: create staging path: %v", v.VolumeID, err)
	}
	opts := slices.Clone(v.MountFlags)
	if v.ReadOnly {
		opts = append(opts, "ro")
	}
	if fsType == "xfs" && !slices.Contains(opts, "nouuid") {
		// A restored snapshot or a clone carries its source's XFS UUID; without
		// nouuid it could not be mounted next to its source.
		opts = append(opts, "nouuid")
	}
	if err := blockdev.Mount(ctx, dev, v.StagingPath, fsType, opts); err != nil {
		return status.Errorf(codes.Internal, "volume %q: mount %s at %s: %v", v.VolumeID, dev, v.StagingPath, err)
	}
	return nil
}

// sectorSizeFromContext reads the logical sector size of a plain volume.
func sectorSizeFromContext(volCtx map[string]string) (int, error) {
	s, ok := volCtx[ctxSectorSize]
	if !ok || s == "" {
		return 512, nil
	}
	switch s {
	case "512":
		return 512, nil
	case "4096":
		return 4096, nil
	}
	return 0, status.Errorf(codes.InvalidArgument, "volume_context.sectorSize %q: accepts \"512\" or \"4096\"", s)
}

// startEngine reads the header, unwraps the passphrase through the KMS,
// unlocks the volume key and hands it to a new engine process. The key and
// the passphrase are zeroed before it returns.
func (n *NodeServer) startEngine(ctx context.Context, v *nodestate.Volume, volCtx map[string]string) (*nodestate.Engine, int, error) {
	f, err := os.Open(v.Image)
	if err != nil {
		return nil, 0, status.Errorf(codes.Internal, "volume %q: open image: %v", v.VolumeID, err)
	}
	// The header reads its keyslot area from f at Unlock: keep f open.
	defer f.Close()
	hdr, err := crypt.ReadHeader(f)
	if err != nil {
		return nil, 0, status.Errorf(codes.FailedPrecondition, "volume %q is marked encrypted but its image has no usable LUKS2 header: %v", v.VolumeID, err)
	}
	if c := hdr.Cipher(); c != "aes-xts-plain64" {
		return nil, 0, status.Errorf(codes.FailedPrecondition, "volume %q uses cipher %s; only aes-xts-plain64 is supported", v.VolumeID, c)
	}
	tok, ok := hdr.KMSToken()
	if !ok {
		return nil, 0, status.Errorf(codes.FailedPrecondition, "volume %q has no csi-encdisk-kms token in its LUKS2 header", v.VolumeID)
	}
	if n.cfg.KMS == nil {
		return nil, 0, status.Errorf(codes.FailedPrecondition, "volume %q is encrypted but this node has no KMS configured", v.VolumeID)
	}
	client, err := n.cfg.KMS.Get(tok.KMSID)
	if err != nil {
		return nil, 0, status.Errorf(codes.FailedPrecondition, "volume %q: %v", v.VolumeID, err)
	}
	passphrase, err := client.Decrypt(kmsclient.WithOperation(ctx, "NodeStageVolume"), requestUID(),
		&kmsclient.Wrapped{Ciphertext: tok.Ciphertext, KeyID: tok.KeyID, Annotations: tok.Annotations})
	if err != nil {
		code := codes.Internal
		if kmsclient.IsUnavailable(err) {
			code = codes.Unavailable
		}
		return nil, 0, status.Errorf(code, "volume %q: unwrap the passphrase through KMS %q: %v", v.VolumeID, tok.KMSID, err)
	}
	lockMemory(passphrase)
	vk, err := hdr.Unlock(passphrase)
	if err == nil && !v.ReadOnly {
		// A read-only stage never writes to the image, not even its header.
		rewrapIfRotated(ctx, v.VolumeID, v.Image, client, tok, passphrase)
	}
	clear(passphrase)
	unlockMemory(passphrase)
	if err != nil {
		return nil, 0, status.Errorf(codes.Internal, "volume %q: unlock keyslot: %v", v.VolumeID, err)
	}
	lockMemory(vk)
	defer func() {
		clear(vk)
		unlockMemory(vk)
	}()

	allowDiscards := false
	if s, ok := volCtx[ctxAllowDiscards]; ok && s != "" {
		allowDiscards, err = strconv.ParseBool(s)
		if err != nil {
			return nil, 0, status.Errorf(codes.InvalidArgument, "volume_context.allowDiscards %q: accepts \"true\" or \"false\"", s)
		}
	}
	if err := os.MkdirAll(v.RunDir, 0o700); err != nil {
		return nil, 0, status.Errorf(codes.Internal, "volume %q: create run dir: %v", v.VolumeID, err)
	}
	spec := blockdev.EngineSpec{
		VolumeID:      v.VolumeID,
		Image:         v.Image,
		DataOffset:    hdr.DataOffset(),
		SectorSize:    hdr.SectorSize(),
		AllowDiscards: allowDiscards,
		RunDir:        v.RunDir,
	}
	eng, err := blockdev.StartEngine(ctx, n.cfg.EngineBinary, spec, vk)
	if err != nil {
		return nil, 0, status.Errorf(codes.Internal, "volume %q: start engine: %v", v.VolumeID, err)
	}
	return &nodestate.Engine{
		PID:           eng.PID,
		File:          eng.File,
		ControlSocket: eng.ControlSocket,
		DataOffset:    hdr.DataOffset(),
		AllowDiscards: allowDiscards,
	}, hdr.SectorSize(), nil
}

// lockMemory keeps a secret out of swap where the OS allows (best effort:
// RLIMIT_MEMLOCK may forbid it); unlockMemory undoes it after zeroing.
func lockMemory(b []byte) {
	if len(b) > 0 {
		_ = unix.Mlock(b)
	}
}

func unlockMemory(b []byte) {
	if len(b) > 0 {
		_ = unix.Munlock(b)
	}
}

// requestUID makes the per-request UID the KMS v2 API asks for.
func requestUID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// NodeUnstageVolume undoes NodeStageVolume in reverse order. It is safe to
// repeat and works when any piece is already gone.
func (n *NodeServer) NodeUnstageVolume(ctx context.Context, req *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "volume_id is required")
	}
	staging := req.GetStagingTargetPath()
	if staging == "" {
		return nil, status.Error(codes.InvalidArgument, "staging_target_path is required")
	}
	unlock, err := n.locks.lock(ctx, id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	log := logger(ctx, "NodeUnstageVolume", id)

	v, err := n.loadState(id)
	if err != nil {
		return nil, err
	}
	if v == nil {
		if v = n.orphanState(id, staging); v == nil {
			log.V(2).Info("volume not staged; nothing to do")
			return &csi.NodeUnstageVolumeResponse{}, nil
		}
		log.Info("no state file for the volume, but pieces of a stage remain; tearing them down")
	}
	if v.StagingPath != staging {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %q is staged at %s, not %s", id, v.StagingPath, staging)
	}
	var still []string
	for _, t := range v.Targets {
		if mounted, _ := isMountPoint(t); mounted {
			still = append(still, t)
		}
	}
	if len(still) > 0 {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %q is still published at %s; unpublish it first", id, strings.Join(still, ", "))
	}
	if err := n.teardown(ctx, v); err != nil {
		return nil, status.Errorf(codes.Internal, "volume %q: unstage: %v", id, err)
	}
	log.Info("volume unstaged")
	return &csi.NodeUnstageVolumeResponse{}, nil
}

// orphanState rebuilds a state for a volume whose state file is gone but
// whose stage left pieces: a mount at the staging path, an engine run
// directory, or a loop device on the image. nil when there is nothing.
func (n *NodeServer) orphanState(id, staging string) *nodestate.Volume {
	v := &nodestate.Volume{VolumeID: id, StagingPath: staging, RunDir: n.state.RunDir(id)}
	found := false
	if mounted, _ := isMountPoint(staging); mounted {
		v.AccessType = nodestate.AccessMount
		found = true
	}
	if _, err := os.Stat(v.RunDir); err == nil {
		v.Encrypted = true
		found = true
	}
	if img, err := n.cfg.ImagePath(id); err == nil {
		v.Image = img
		if dev, _ := loopByBackingFile(img); dev != "" {
			found = true
		}
	}
	if !found {
		return nil
	}
	return v
}

// teardown removes every piece of a (half) staged volume that still
// exists: the filesystem mount, the loop device, the engine, its FUSE mount
// and run directory, and finally the state file. Each step checks what is
// there, so it is safe after a crash at any point and safe to repeat.
func (n *NodeServer) teardown(ctx context.Context, v *nodestate.Volume) error {
	if v.AccessType == nodestate.AccessMount && v.StagingPath != "" {
		if err := unmountIfMounted(ctx, v.StagingPath); err != nil {
			return err
		}
	}
	backing := v.Image
	if v.Engine != nil {
		backing = v.Engine.File
	} else if v.Encrypted && v.RunDir != "" {
		backing = blockdev.PlainFile(v.RunDir)
	}
	if err := detachLoop(ctx, v.Loop, backing); err != nil {
		return err
	}
	v.Loop = ""
	if v.Encrypted && v.RunDir != "" {
		if err := stopEngine(ctx, v); err != nil {
			return err
		}
		if err := blockdev.UnmountEngine(ctx, v.RunDir); err != nil {
			return fmt.Errorf("unmount the engine's FUSE mount: %w", err)
		}
		if err := os.RemoveAll(v.RunDir); err != nil {
			return fmt.Errorf("remove run dir: %w", err)
		}
	}
	if err := n.state.Delete(v.VolumeID); err != nil {
		return err
	}
	return nil
}

// unmountIfMounted unmounts path if something is mounted there.
func unmountIfMounted(ctx context.Context, path string) error {
	mounted, err := isMountPoint(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("check mount at %s: %w", path, err)
	}
	if !mounted {
		return nil
	}
	if err := blockdev.Unmount(ctx, path); err != nil {
		return fmt.Errorf("unmount %s: %w", path, err)
	}
	return nil
}

// detachLoop detaches dev, but only while it is still backed by file: a loop
// device number can be reused by another volume once it was detached.
func detachLoop(ctx context.Context, dev, file string) error {
	if dev == "" {
		// A crash between attach and save leaves no record; find it by file.
		found, err := loopByBackingFile(file)
		if err != nil || found == "" {
			return err
		}
		dev = found
	} else if !loopBackedBy(dev, file) {
		return nil
	}
	if err := blockdev.LoopDetach(ctx, dev); err != nil {
		return fmt.Errorf("detach loop device %s: %w", dev, err)
	}
	return nil
}

// loopBackingFile reads a loop device's backing file from sysfs without
// touching the file itself (which may sit on a dead FUSE mount).
func loopBackingFile(dev string) string {
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop", "backing_file"))
	if err != nil {
		return ""
	}
	return strings.TrimSuffix(strings.TrimSpace(string(b)), " (deleted)")
}

func loopBackedBy(dev, file string) bool {
	if dev == "" || file == "" {
		return false
	}
	got := loopBackingFile(dev)
	if got == "" {
		return false
	}
	if got == file {
		return true
	}
	if abs, err := filepath.Abs(file); err == nil && got == abs {
		return true
	}
	return false
}

// loopByBackingFile scans sysfs for a loop device backed by file.
func loopByBackingFile(file string) (string, error) {
	if file == "" {
		return "", nil
	}
	entries, err := os.ReadDir("/sys/block")
	if err != nil {
		return "", fmt.Errorf("list loop devices: %w", err)
	}
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), "loop") {
			continue
		}
		dev := "/dev/" + e.Name()
		if loopBackedBy(dev, file) {
			return dev, nil
		}
	}
	return "", nil
}

// stopEngine asks the engine to shut down over its control socket and kills
// it if it does not answer, then waits until it is gone.
func stopEngine(ctx context.Context, v *nodestate.Volume) error {
	if v.Engine == nil {
		// A crash during StartEngine: find the engine by its run directory.
		if pid := findEnginePID(v.RunDir); pid > 0 {
			v.Engine = &nodestate.Engine{PID: pid}
		} else {
			return nil
		}
	}
	pid := v.Engine.PID
	if v.Engine.ControlSocket != "" {
		if _, err := os.Stat(v.Engine.ControlSocket); err == nil {
			sctx, cancel := context.WithTimeout(ctx, engineStopTimeout)
			err := blockdev.DialControl(v.Engine.ControlSocket).Shutdown(sctx)
			cancel()
			if err == nil && waitGone(ctx, pid, v.RunDir, 10*time.Second) {
				return nil
			}
		}
	}
	if !isEngineProcess(pid, v.RunDir) {
		return nil
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("kill engine pid %d: %w", pid, err)
	}
	if !waitGone(ctx, pid, v.RunDir, 10*time.Second) {
		return fmt.Errorf("engine pid %d did not exit after SIGKILL", pid)
	}
	return nil
}

// isEngineProcess reports whether pid is a live (not zombie) engine serving
// runDir, so that a reused pid is never killed.
func isEngineProcess(pid int, runDir string) bool {
	if pid <= 0 || runDir == "" {
		return false
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	if i := strings.LastIndexByte(string(stat), ')'); i > 0 && i+2 < len(stat) && stat[i+2] == 'Z' {
		return false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	args := strings.Split(string(cmdline), "\x00")
	return slices.Contains(args, "engine") && strings.Contains(string(cmdline), runDir)
}

// findEnginePID looks for a live engine serving runDir.
func findEnginePID(runDir string) int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if isEngineProcess(pid, runDir) {
			return pid
		}
	}
	return 0
}

// waitGone waits until pid no longer is the engine of runDir.
func waitGone(ctx context.Context, pid int, runDir string, limit time.Duration) bool {
	deadline := time.Now().Add(limit)
	for {
		if !isEngineProcess(pid, runDir) {
			return true
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
}
