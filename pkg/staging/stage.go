package staging

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"time"

	"golang.org/x/sys/unix"

	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/blockdev"
	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
	"github.com/csi-encdisk/csi-encdisk/pkg/filesystem"
	"github.com/csi-encdisk/csi-encdisk/pkg/imagelock"
	"github.com/csi-encdisk/csi-encdisk/pkg/loopdev"
	"github.com/csi-encdisk/csi-encdisk/pkg/mounts"
	"github.com/csi-encdisk/csi-encdisk/pkg/nodestate"
)

// DefaultFSType is made on a volume whose request names none.
const DefaultFSType = "ext4"

// Request is what to stage.
type Request struct {
	VolumeID string
	Image    string
	// StagingPath is where the filesystem is mounted (mount access). It may
	// be empty for block access outside CSI (volume open --block).
	StagingPath string
	Access      string // nodestate.AccessMount or nodestate.AccessBlock
	FSType      string // "" means: what the volume holds, else DefaultFSType
	MountFlags  []string
	ReadOnly    bool
	// Encrypted is what the caller believes (the volume context); nil when
	// it does not say. The image's header decides; a disagreement is
	// ErrEncryptionMismatch and nothing is attached.
	Encrypted *bool
	// KMSID is the volume context's kmsID: it names the KMS of an image in
	// Ceph RBD ("rbd:POOL/IMAGE"), whose header only its engine reads.
	KMSID string
	// SectorSize of a plain volume's loop device (512 if 0). An encrypted
	// volume's comes from its header.
	SectorSize    int
	AllowDiscards bool
	// PassphraseFile unlocks an image made by hand (volume open --key-file);
	// "" means the KMS named in the header's token.
	PassphraseFile string
	// NeverFormat: a volume without a filesystem is ErrNoFilesystem instead
	// of getting one (its data came from elsewhere: a restore, a clone, an
	// image opened by hand; "no filesystem" then means a wrong key or a
	// damaged image, and a mkfs would destroy what is left).
	NeverFormat bool
}

// Stage makes the volume usable at req.StagingPath (or as a loop device for
// block access) and returns its state. A volume already staged the same way
// and healthy is left as it is; a broken or half-made stage is torn down and
// made again. On failure everything made is undone.
func (m *Manager) Stage(ctx context.Context, req Request) (*nodestate.Volume, error) {
	log := klog.FromContext(ctx).WithValues("volumeID", req.VolumeID)
	if req.StagingPath != "" {
		if err := m.checkPath("staging path", req.StagingPath); err != nil {
			return nil, err
		}
	}
	old, err := m.Load(req.VolumeID)
	if err != nil {
		return nil, err
	}
	if old != nil {
		done, err := m.restage(ctx, old, req)
		if err != nil || done {
			return old, err
		}
	}
	encrypted, kmsID, err := inspectImage(req)
	if err != nil {
		return nil, err
	}
	if req.Encrypted != nil && *req.Encrypted != encrypted {
		return nil, fmt.Errorf("%w: the volume context says encrypted=%t, the image %s %s", ErrEncryptionMismatch,
			*req.Encrypted, req.Image, map[bool]string{true: "has a LUKS2 header", false: "has none"}[encrypted])
	}
	v := &nodestate.Volume{
		VolumeID:    req.VolumeID,
		Phase:       nodestate.PhaseStaging,
		Encrypted:   encrypted,
		Image:       req.Image,
		StagingPath: req.StagingPath,
		AccessType:  req.Access,
		FSType:      req.FSType,
		MountFlags:  req.MountFlags,
		ReadOnly:    req.ReadOnly,
		RunDir:      m.cfg.Store.RunDir(req.VolumeID),
	}
	if err := m.cfg.Store.Save(v); err != nil {
		return nil, err
	}
	if err := m.build(ctx, v, req, kmsID); err != nil {
		log.Error(err, "Stage failed, undoing")
		if terr := m.Teardown(context.WithoutCancel(ctx), v); terr != nil {
			log.Error(terr, "Undo of a failed stage was incomplete; the next stage or a restart retries")
		}
		return nil, err
	}
	v.Phase = nodestate.PhaseStaged
	if err := m.cfg.Store.Save(v); err != nil {
		return nil, err
	}
	log.Info("Volume staged", "encrypted", v.Encrypted, "access", v.AccessType, "fsType", v.FSType, "loop", v.Loop, "stagingPath", v.StagingPath)
	return v, nil
}

// restage handles a volume that already has state: done when it is staged
// as asked and healthy; otherwise what is left is torn down first.
func (m *Manager) restage(ctx context.Context, old *nodestate.Volume, req Request) (done bool, err error) {
	if old.Phase == nodestate.PhaseStaged {
		if old.StagingPath != req.StagingPath {
			return false, fmt.Errorf("%w: volume %q is staged at %s, not %s", ErrStagedElsewhere, req.VolumeID, old.StagingPath, req.StagingPath)
		}
		if old.AccessType != req.Access || (req.FSType != "" && old.FSType != req.FSType) || old.ReadOnly != req.ReadOnly {
			return false, fmt.Errorf("%w: volume %q is staged at %s as %s %s, read-only %t", ErrIncompatible, req.VolumeID, old.StagingPath, old.AccessType, old.FSType, old.ReadOnly)
		}
		problems := m.Health(ctx, old)
		if len(problems) == 0 {
			return true, nil
		}
		klog.FromContext(ctx).Info("Staged volume is broken, staging it again", "volumeID", req.VolumeID, "problems", joinProblems(problems))
	}
	if len(old.Targets) > 0 {
		return false, fmt.Errorf("%w: volume %q is published at %v and cannot be staged again", ErrStillPublished, req.VolumeID, old.Targets)
	}
	if err := m.Teardown(ctx, old); err != nil {
		return false, fmt.Errorf("clean up the earlier stage of %q: %w", req.VolumeID, err)
	}
	return false, nil
}

// inspectImage reads whether an image is encrypted (it starts with a LUKS2
// header) and the kmsID of its token. It reads public header data only. An
// image in Ceph RBD is not read here (the node has no librbd): the volume
// context says whether it is encrypted (encrypted when it does not say, as
// every RBD volume was before unencrypted ones existed) and names its KMS,
// and its engine, which serves it either way, refuses to serve it in a mode
// its volume record (the RBD image's metadata) disagrees with
// (ErrEncryptionMismatch, nothing attached).
func inspectImage(req Request) (encrypted bool, kmsID string, err error) {
	image := req.Image
	if isRBD(image) {
		if req.Encrypted != nil && !*req.Encrypted {
			return false, "", nil
		}
		return true, req.KMSID, nil
	}
	f, err := os.Open(image)
	if err != nil {
		return false, "", fmt.Errorf("open image: %w", err)
	}
	defer f.Close()
	h, err := crypt.ReadHeader(f)
	switch {
	case errors.Is(err, crypt.ErrNotLUKS2):
		return false, "", nil
	case err != nil:
		return false, "", fmt.Errorf("%w: %s: %w", ErrBadHeader, image, err)
	}
	if tok, ok := h.KMSToken(); ok {
		kmsID = tok.KMSID
	}
	return true, kmsID, nil
}

// build makes the pieces of a stage, saving the state after each so that a
// crash or a failure can undo exactly what exists.
func (m *Manager) build(ctx context.Context, v *nodestate.Volume, req Request, kmsID string) error {
	backing := v.Image
	v.SectorSize = req.SectorSize
	if v.SectorSize == 0 {
		v.SectorSize = 512
	}
	if servedByEngine(v) {
		eng, err := m.startEngine(ctx, v, req, kmsID)
		if err != nil {
			return err
		}
		v.Engine = &nodestate.Engine{PID: eng.PID, File: eng.File, ControlSocket: eng.ControlSocket,
			DataOffset: eng.DataOffset, AllowDiscards: req.AllowDiscards}
		v.SectorSize = eng.SectorSize
		backing = eng.File
		if err := m.cfg.Store.Save(v); err != nil {
			return err
		}
	}
	// Record the backing file's identity before attaching, so that a crash
	// right after the attach still finds the loop device.
	var err error
	if v.LoopBackingDev, v.LoopBackingInode, err = loopdev.BackingOf(backing); err != nil {
		return err
	}
	if err := m.cfg.Store.Save(v); err != nil {
		return err
	}
	// A read-only raw block volume gets a read-only loop device: a read-only
	// bind mount does not stop writes through a device node. (A read-only
	// filesystem stays on a writable loop device so its journal can replay.)
	// A plain image's loop device holds the image's writer lock
	// (pkg/imagelock) for as long as it is attached: the lock belongs to the
	// open file description the loop device keeps, so it survives restarts
	// of this process and goes with the detach. An engine holds the lock
	// on its image itself.
	var lock func(*os.File) error
	if !servedByEngine(v) {
		mode := imagelock.Write
		if v.ReadOnly {
			mode = imagelock.Read
		}
		lock = func(f *os.File) error {
			return imagelock.Lock(f, mode, imagelock.Holder("loop device of node plugin", v.VolumeID))
		}
	}
	dev, err := loopdev.AttachLocked(ctx, backing, v.SectorSize, v.ReadOnly && v.AccessType == nodestate.AccessBlock, lock)
	if err != nil {
		return fmt.Errorf("attach a loop device: %w", err)
	}
	v.Loop = dev.Path
	if seq, err := loopdev.DiskSeq(dev.Path); err == nil {
		v.LoopDiskSeq = seq
	}
	if err := m.cfg.Store.Save(v); err != nil {
		return err
	}
	if v.AccessType == nodestate.AccessBlock {
		return nil
	}
	return m.mountFilesystem(ctx, v, req.NeverFormat)
}

// servedByEngine reports whether the volume's loop device sits on an
// engine's FUSE file: an encrypted volume's, and every volume in Ceph RBD
// (the node reaches RADOS only through an engine; an unencrypted one's
// serves it in plaintext). A plain image file gets its loop device directly.
func servedByEngine(v *nodestate.Volume) bool { return v.Encrypted || isRBD(v.Image) }

// startEngine starts the volume's engine; it unlocks the image itself, or
// serves an unencrypted volume (in Ceph RBD) in plaintext: the mode comes
// from the volume context (v.Encrypted), and the engine refuses an image
// whose record says otherwise.
func (m *Manager) startEngine(ctx context.Context, v *nodestate.Volume, req Request, kmsID string) (*blockdev.Engine, error) {
	spec := blockdev.EngineSpec{
		VolumeID:        v.VolumeID,
		Image:           v.Image,
		RunDir:          v.RunDir,
		PassphraseFile:  req.PassphraseFile,
		ReadOnly:        v.ReadOnly,
		AllowDiscards:   req.AllowDiscards,
		BufferedBacking: m.cfg.BufferedBacking,
		FUSETransport:   m.cfg.FUSETransport,
	}
	switch {
	case !v.Encrypted:
		if spec.PassphraseFile != "" {
			return nil, fmt.Errorf("%w: volume %q is unencrypted, and a key file was given", ErrEncryptionMismatch, v.VolumeID)
		}
		spec.Plaintext, spec.SectorSize = true, v.SectorSize
	case spec.PassphraseFile == "":
		if m.cfg.KMS == nil {
			return nil, fmt.Errorf("%w: volume %q is encrypted but this node has no KMS", ErrNoKMS, v.VolumeID)
		}
		ep, timeout, err := m.cfg.KMS.Endpoint(kmsID)
		if err != nil {
			return nil, err
		}
		spec.KMSEndpoint, spec.KMSID, spec.KMSTimeout = ep, kmsID, timeout
	}
	if err := os.MkdirAll(v.RunDir, 0o700); err != nil {
		return nil, fmt.Errorf("create run dir: %w", err)
	}
	eng, rep, err := m.cfg.Engines.Start(ctx, spec)
	if rep != nil && m.cfg.KMS != nil && v.Encrypted {
		m.cfg.KMS.CountCalls(kmsID, rep.KMSCalls)
	}
	return eng, err
}

// mountFilesystem makes a filesystem on the loop device if it has none
// (never over an existing one) and mounts it at the staging path.
func (m *Manager) mountFilesystem(ctx context.Context, v *nodestate.Volume, neverFormat bool) error {
	found, err := filesystem.Detect(ctx, v.Loop)
	if err != nil {
		return err
	}
	formattedBefore := false
	if found == "" && !neverFormat {
		if isRBD(v.Image) {
			// The engine has the RBD image open: it reads the record.
			if formattedBefore, err = blockdev.DialControl(blockdev.ControlSocketPath(v.RunDir)).Formatted(ctx); err != nil {
				return fmt.Errorf("ask the engine whether volume %q was formatted before: %w", v.VolumeID, err)
			}
		} else {
			formattedBefore = wasFormatted(v.Image)
		}
	}
	fsType := v.FSType
	switch {
	case found == "" && v.ReadOnly:
		return fmt.Errorf("%w: volume %q has no filesystem and its access mode is read-only", ErrNoFilesystem, v.VolumeID)
	case found == "" && neverFormat:
		return fmt.Errorf("%w: volume %q should hold data but shows no filesystem (a wrong key or a damaged image?); nothing was written", ErrNoFilesystem, v.VolumeID)
	case found == "" && formattedBefore:
		return fmt.Errorf("%w: volume %q was formatted before (its image records it) but shows no filesystem now (a wrong key or a damaged image?); nothing was written", ErrNoFilesystem, v.VolumeID)
	case found == "":
		if fsType == "" {
			fsType = DefaultFSType
		}
		if err := filesystem.Make(ctx, v.Loop, fsType); err != nil {
			return err
		}
		mark := func() error { return markFormatted(v.Image) }
		if isRBD(v.Image) {
			mark = func() error { return blockdev.DialControl(blockdev.ControlSocketPath(v.RunDir)).MarkFormatted(ctx) }
		}
		if err := mark(); err != nil {
			// The volume works; only the guard against a later mkfs over
			// its data is missing.
			klog.FromContext(ctx).Error(err, "Could not record on the image that the volume was formatted; a later stage that finds no filesystem would format it again", "volumeID", v.VolumeID, "image", v.Image)
		}
	case fsType == "":
		fsType = found
	case found != fsType:
		return fmt.Errorf("%w: volume %q holds a %s filesystem, not %s; it is never formatted over", ErrFilesystemMismatch, v.VolumeID, found, fsType)
	}
	v.FSType = fsType
	// A volume expanded while it was not staged: grow its ext4 now, before
	// mounting. Kubelet's NodeExpandVolume may only come once the volume is
	// published, too late for an offline resize, and an online ext4 resize
	// needs CAP_SYS_RESOURCE, which some node containers lack; then
	// resize2fs has nothing left to do. (xfs grows online without it.)
	if found == fsType && slices.Contains([]string{"ext2", "ext3", "ext4"}, fsType) && !v.ReadOnly {
		grew, err := filesystem.GrowExt4Unmounted(ctx, v.Loop)
		if err != nil {
			return err
		}
		if grew {
			klog.FromContext(ctx).Info("Grew the filesystem to the volume's size before mounting", "volumeID", v.VolumeID, "fsType", fsType)
		}
	}
	if err := m.cfg.Store.Save(v); err != nil {
		return err
	}
	if err := os.MkdirAll(v.StagingPath, 0o750); err != nil {
		return fmt.Errorf("create staging path: %w", err)
	}
	return mounts.Mount(ctx, v.Loop, v.StagingPath, fsType, mountOptions(v))
}

// mountOptions are the staged filesystem's mount options.
func mountOptions(v *nodestate.Volume) []string {
	opts := slices.Clone(v.MountFlags)
	if v.ReadOnly {
		opts = append(opts, "ro")
	}
	if v.FSType == "xfs" && !slices.Contains(opts, "nouuid") {
		// A restored snapshot or a clone carries its source's XFS UUID; without
		// nouuid it could not be mounted next to its source.
		opts = append(opts, "nouuid")
	}
	return opts
}

// FormattedXattr marks an image whose volume the node formatted once (the
// value is the time, RFC 3339): a later stage that finds no filesystem on
// it refuses to format it again. It is kept with the image itself, so it
// goes with the volume wherever its image goes, and with the volume's
// deletion. Plain public data.
const FormattedXattr = "user.csi-encdisk.formatted"

// wasFormatted reports whether image carries FormattedXattr.
func wasFormatted(image string) bool {
	n, err := unix.Getxattr(image, FormattedXattr, nil)
	return err == nil && n > 0
}

// markFormatted sets FormattedXattr on image and syncs it.
func markFormatted(image string) error {
	if err := unix.Setxattr(image, FormattedXattr, []byte(time.Now().UTC().Format(time.RFC3339)), 0); err != nil {
		return fmt.Errorf("record the format on %s: %w", image, err)
	}
	f, err := os.Open(image)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}
