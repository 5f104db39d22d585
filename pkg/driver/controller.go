package driver

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/backend"
	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
	"github.com/csi-encdisk/csi-encdisk/pkg/rbd"
)

const (
	// defaultVolumeSize is used when a request names no capacity.
	defaultVolumeSize = 1 << 30
	volumeKeySize     = 64 // aes-xts-plain64 with two AES-256 keys
	passphraseSize    = 32 // 256 random bits, wrapped by the KMS
)

// conversionRefused is the message of both refused conversions: source
// kind, source ID, its state, the parameter's value, its state, the wanted
// kind.
const conversionRefused = "conversion is not possible: an %[3]s %[1]s cannot become an %[5]s volume " +
	"(%[1]s %[2]s is %[3]s, parameter \"encrypted\" is %[4]q); create a new %[5]s volume and copy the data into it " +
	"(e.g. mount both PVCs in one pod and rsync between them)"

// ControllerServer implements csi.ControllerServer on a backend.Pool.
type ControllerServer struct {
	csi.UnimplementedControllerServer

	pool   *pools
	kms    kmsSet
	region string
}

var _ csi.ControllerServer = (*ControllerServer)(nil)

// newControllerServer returns a controller serving one region.
// pool is the file pool, or the driver's pools (file and RBD).
func newControllerServer(pool backend.Pool, kms kmsSet, region string) *ControllerServer {
	p, ok := pool.(*pools)
	if !ok {
		p = newPools(pool)
	}
	return &ControllerServer{pool: p, kms: kms, region: region}
}

// ControllerGetCapabilities lists what the controller does.
func (c *ControllerServer) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	types := []csi.ControllerServiceCapability_RPC_Type{
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT,
		csi.ControllerServiceCapability_RPC_LIST_SNAPSHOTS,
		csi.ControllerServiceCapability_RPC_GET_SNAPSHOT,
		csi.ControllerServiceCapability_RPC_LIST_VOLUMES,
		csi.ControllerServiceCapability_RPC_GET_CAPACITY,
		csi.ControllerServiceCapability_RPC_CLONE_VOLUME,
		csi.ControllerServiceCapability_RPC_EXPAND_VOLUME,
	}
	resp := &csi.ControllerGetCapabilitiesResponse{}
	for _, t := range types {
		resp.Capabilities = append(resp.Capabilities, &csi.ControllerServiceCapability{
			Type: &csi.ControllerServiceCapability_Rpc{Rpc: &csi.ControllerServiceCapability_RPC{Type: t}},
		})
	}
	return resp, nil
}

// checkCapabilities refuses access modes a single-node loop device cannot
// give and filesystems the node cannot make.
func checkCapabilities(caps []*csi.VolumeCapability) error {
	if len(caps) == 0 {
		return invalid("volume_capabilities: at least one capability is required")
	}
	for _, vc := range caps {
		if vc == nil {
			return invalid("volume_capabilities: empty capability")
		}
		switch mode := vc.GetAccessMode().GetMode(); mode {
		case csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY:
		default:
			return invalid("volume_capabilities: access mode %s is not supported (accepted: SINGLE_NODE_WRITER, SINGLE_NODE_READER_ONLY)", mode)
		}
		switch {
		case vc.GetBlock() != nil:
		case vc.GetMount() != nil:
			if fs := vc.GetMount().GetFsType(); fs != "" && fs != "ext4" && fs != "xfs" {
				return invalid("volume_capabilities: fs_type %q is not supported (accepted: ext4, xfs)", fs)
			}
		default:
			return invalid("volume_capabilities: access type must be block or mount")
		}
	}
	return nil
}

// minFilesystemBytes is the smallest volume the node can make each
// filesystem on: mkfs.xfs refuses less than 300 MiB; mkfs.ext4 works from
// 256 KiB, and 1 MiB leaves it room for a journal.
var minFilesystemBytes = map[string]int64{"ext4": 1 << 20, "xfs": 300 << 20}

// minFilesystemSize is the smallest size a new empty volume with these
// capabilities may have, and the filesystem that needs it: the largest
// minimum of the filesystems its mount capabilities name (their fs_type,
// else the class's fstype parameter, else ext4). Block-only volumes need
// no filesystem: 0.
func minFilesystemSize(caps []*csi.VolumeCapability, paramFS string) (int64, string) {
	var min int64
	var which string
	for _, vc := range caps {
		if vc.GetMount() == nil {
			continue
		}
		fs := vc.GetMount().GetFsType()
		if fs == "" {
			fs = paramFS
		}
		if fs == "" {
			fs = DefaultFSType
		}
		if m := minFilesystemBytes[fs]; m > min {
			min, which = m, fs
		}
	}
	return min, which
}

// MaxImageBytes is the largest image (header included) this driver makes:
// 1 EiB. Every capacity is checked against it before any arithmetic, so a
// size plus a header or a rounding can never overflow an int64. Pools whose
// filesystem holds smaller files refuse larger images with EFBIG, which is
// OutOfRange as well.
const MaxImageBytes int64 = 1 << 60

// maxCapacity is the largest usable capacity of a volume whose data starts
// headerBytes into its image, rounded down to the sector size.
func maxCapacity(headerBytes int64, sector int) int64 {
	if headerBytes < 0 || headerBytes >= MaxImageBytes {
		return 0
	}
	return (MaxImageBytes - headerBytes) / int64(sector) * int64(sector)
}

// roundUp rounds n up to a multiple of unit; n must be at most a multiple of
// unit that fits an int64 (wantedSize checks it first).
func roundUp(n, unit int64) int64 { return (n + unit - 1) / unit * unit }

// wantedSize returns the size to give a volume, at least minSize, rounded
// up to the sector size, within the request's range and at most maxSize (a
// multiple of the sector size). Every input is range-checked before any
// arithmetic: negative values are InvalidArgument, values beyond maxSize and
// impossible ranges OutOfRange, naming the field and what it accepts.
func wantedSize(r *csi.CapacityRange, minSize int64, sector int, maxSize int64) (int64, error) {
	req, lim := r.GetRequiredBytes(), r.GetLimitBytes()
	if req < 0 {
		return 0, invalid("capacity_range.required_bytes: %d is negative (accepted: 0 to %d)", req, maxSize)
	}
	if lim < 0 {
		return 0, invalid("capacity_range.limit_bytes: %d is negative (accepted: 0 for no limit, or at least required_bytes)", lim)
	}
	if lim > 0 && req > lim {
		return 0, status.Errorf(codes.OutOfRange, "capacity_range: required_bytes %d exceeds limit_bytes %d", req, lim)
	}
	if req > maxSize {
		return 0, status.Errorf(codes.OutOfRange, "capacity_range.required_bytes: %d is more than the maximum %d bytes a volume can have "+
			"(images are at most %d bytes, header included; sector size %d)", req, maxSize, MaxImageBytes, sector)
	}
	if minSize < 0 || minSize > maxSize {
		return 0, status.Errorf(codes.OutOfRange, "volume_content_source: the source's size %d is outside 0 to %d bytes", minSize, maxSize)
	}
	size := req
	if size == 0 && minSize > 0 {
		size = minSize // a copy is as large as its source
	}
	if size == 0 {
		size = defaultVolumeSize
		if lim > 0 && lim < size {
			size = lim
		}
	}
	size = max(roundUp(size, int64(sector)), minSize) // both at most maxSize, a multiple of sector
	if lim > 0 && size > lim {
		return 0, status.Errorf(codes.OutOfRange, "capacity_range.limit_bytes: the volume needs %d bytes (sector size %d, source size %d), more than limit_bytes %d", size, sector, minSize, lim)
	}
	return size, nil
}

// source is the object a new volume is made from.
type source struct {
	meta *backend.Meta
	kind string // "snapshot" or "volume", for messages
}

func (c *ControllerServer) contentSource(ctx context.Context, cs *csi.VolumeContentSource) (*source, error) {
	if cs == nil {
		return nil, nil
	}
	var kind backend.Kind
	var id string
	switch {
	case cs.GetSnapshot() != nil:
		kind, id = backend.KindSnapshot, cs.GetSnapshot().GetSnapshotId()
	case cs.GetVolume() != nil:
		kind, id = backend.KindVolume, cs.GetVolume().GetVolumeId()
	default:
		return nil, invalid("volume_content_source: must name a snapshot or a volume")
	}
	if id == "" {
		return nil, invalid("volume_content_source: empty %s ID", kind)
	}
	m, err := c.pool.Get(ctx, kind, id)
	if errors.Is(err, backend.ErrNotFound) {
		return nil, status.Errorf(codes.NotFound, "volume_content_source: %s %q does not exist", kind, id)
	}
	if err != nil {
		return nil, toStatus(err, "volume_content_source")
	}
	return &source{meta: m, kind: string(kind)}, nil
}

// checkTopology returns an error when the request's accessibility
// requirements exclude this controller's region.
func (c *ControllerServer) checkTopology(req *csi.TopologyRequirement) error {
	if req == nil || c.region == "" {
		return nil
	}
	all := append(append([]*csi.Topology{}, req.GetRequisite()...), req.GetPreferred()...)
	if len(all) == 0 {
		return nil
	}
	for _, t := range all {
		if r, ok := t.GetSegments()[TopologyRegionKey]; !ok || r == c.region {
			return nil
		}
	}
	return status.Errorf(codes.ResourceExhausted, "accessibility_requirements: this controller serves region %q (%s), which no requisite or preferred topology allows", c.region, TopologyRegionKey)
}

func (c *ControllerServer) topology() []*csi.Topology {
	if c.region == "" {
		return nil
	}
	return []*csi.Topology{{Segments: map[string]string{TopologyRegionKey: c.region}}}
}

func (c *ControllerServer) csiVolume(m *backend.Meta) *csi.Volume {
	v := &csi.Volume{
		VolumeId:           m.ID,
		CapacityBytes:      m.Size,
		VolumeContext:      volumeContext(m.Encrypted, m.KMSID, m.SectorSize, m.AllowDiscards, m.Region),
		AccessibleTopology: c.topology(),
	}
	if m.Region != "" {
		v.AccessibleTopology = []*csi.Topology{{Segments: map[string]string{TopologyRegionKey: m.Region}}}
	}
	switch {
	case m.SourceSnapshotID != "":
		v.VolumeContext[ctxContentSource] = "snapshot"
	case m.SourceVolumeID != "":
		v.VolumeContext[ctxContentSource] = "volume"
	}
	switch {
	case m.SourceSnapshotID != "":
		v.ContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
			Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: m.SourceSnapshotID}}}
	case m.SourceVolumeID != "":
		v.ContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
			Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: m.SourceVolumeID}}}
	}
	return v
}

// CreateVolume makes a new volume: a LUKS2 image whose passphrase the KMS
// wraps, a raw sparse image, or a copy of a snapshot or volume that keeps
// the source's encryption and key.
func (c *ControllerServer) CreateVolume(ctx context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	name := req.GetName()
	if name == "" {
		return nil, invalid("name: must not be empty")
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return nil, err
	}
	params, err := parseParams(req.GetParameters())
	if err != nil {
		return nil, invalid("%v", err)
	}
	if err := c.checkTopology(req.GetAccessibilityRequirements()); err != nil {
		return nil, err
	}
	target, err := c.pool.target(params)
	if err != nil {
		return nil, toStatus(err, "CreateVolume")
	}
	unlock, err := c.pool.Lock(ctx, backend.KindVolume, name)
	if err != nil {
		return nil, toStatus(err, "CreateVolume")
	}
	defer unlock()

	src, err := c.contentSource(ctx, req.GetVolumeContentSource())
	if err != nil {
		return nil, err
	}
	meta := backend.Meta{
		Name:          name,
		Kind:          backend.KindVolume,
		Encrypted:     params.Encrypted,
		KMSID:         params.KMSID,
		SectorSize:    params.SectorSize,
		AllowDiscards: params.AllowDiscards,
		Region:        c.region,
		Parameters:    req.GetParameters(),
	}
	var minSize int64
	headerBytes := int64(0)
	if meta.Encrypted && src == nil {
		headerBytes = crypt.DefaultDataOffset
	}
	if src != nil {
		if from, to := location(src.meta.ID), paramsLocation(params); from != to {
			return nil, invalid("volume_content_source: %s %s is in %s, and a volume made from it stays there; parameters %q and %q name %s "+
				"(use a StorageClass with the source's backend and pool)", src.kind, src.meta.ID, from, ParamBackend, ParamPool, to)
		}
		if err := c.checkSource(src, params); err != nil {
			return nil, err
		}
		meta.Encrypted, meta.KMSID, meta.SectorSize = src.meta.Encrypted, src.meta.KMSID, src.meta.SectorSize
		if src.meta.Kind == backend.KindSnapshot {
			meta.SourceSnapshotID = src.meta.ID
		} else {
			meta.SourceVolumeID = src.meta.ID
		}
		minSize = src.meta.Size
		if meta.Encrypted {
			if headerBytes, err = c.dataOffset(ctx, src.meta); err != nil {
				return nil, toStatus(err, "volume_content_source")
			}
		}
	}
	size, err := wantedSize(req.GetCapacityRange(), minSize, meta.SectorSize, maxCapacity(headerBytes, meta.SectorSize))
	if err != nil {
		return nil, err
	}
	if min, fsType := minFilesystemSize(req.GetVolumeCapabilities(), params.FSType); src == nil && size < min {
		// Refused now rather than created and failing at the node's mkfs.
		return nil, status.Errorf(codes.OutOfRange, "capacity_range: %d bytes is too small for a %s filesystem, which needs at least %d bytes (%d MiB)", size, fsType, min, min>>20)
	}
	meta.Size = size

	if old, err := target.Get(ctx, backend.KindVolume, target.ID(backend.KindVolume, name)); err == nil {
		if err := sameVolume(old, &meta, req.GetCapacityRange()); err != nil {
			return nil, err
		}
		return &csi.CreateVolumeResponse{Volume: c.csiVolume(old)}, nil
	} else if !errors.Is(err, backend.ErrNotFound) {
		return nil, toStatus(err, "CreateVolume")
	}

	var m *backend.Meta
	switch {
	case src != nil:
		if src.meta.Kind == backend.KindVolume {
			// Hold the source volume while copying it (see CreateSnapshot). No
			// cycle: a call holding the source's name finds that volume
			// existing and takes no second lock.
			unlockSrc, err := c.pool.Lock(ctx, backend.KindVolume, src.meta.Name)
			if err != nil {
				return nil, toStatus(err, "CreateVolume")
			}
			defer unlockSrc()
		}
		if meta.Encrypted {
			if err := c.checkUnwraps(ctx, src.meta); err != nil {
				return nil, toStatus(err, fmt.Sprintf("CreateVolume %s from %s %s", name, src.kind, src.meta.ID))
			}
		}
		m, err = c.createFromSource(ctx, meta, src, headerBytes+meta.Size)
	case meta.Encrypted:
		m, err = c.createEncrypted(ctx, target, meta)
	default:
		m, err = target.Create(ctx, backend.CreateRequest{Meta: meta, ImageSize: meta.Size})
	}
	if err != nil {
		return nil, toStatus(err, "CreateVolume "+name)
	}
	klog.FromContext(ctx).Info("Created volume", "name", name, "volumeID", m.ID, "encrypted", m.Encrypted,
		"kmsID", m.KMSID, "size", m.Size, "sourceSnapshot", m.SourceSnapshotID, "sourceVolume", m.SourceVolumeID)
	return &csi.CreateVolumeResponse{Volume: c.csiVolume(m)}, nil
}

// checkSource refuses conversions and cross-region restores of encrypted
// sources.
func (c *ControllerServer) checkSource(src *source, params *volumeParams) error {
	if params.EncryptedSet && params.Encrypted != src.meta.Encrypted {
		state := map[bool]string{true: "encrypted", false: "unencrypted"}
		return invalid(conversionRefused, src.kind, src.meta.ID, state[src.meta.Encrypted],
			strconv.FormatBool(params.Encrypted), state[params.Encrypted])
	}
	if src.meta.Encrypted && c.region != "" && src.meta.Region != "" && src.meta.Region != c.region {
		return status.Errorf(codes.FailedPrecondition,
			"%s %s is encrypted with a key of region %q; it cannot be restored in region %q (keys stay in their region)",
			src.kind, src.meta.ID, src.meta.Region, c.region)
	}
	return nil
}

// sameVolume says whether an existing volume answers a repeated request.
func sameVolume(old, want *backend.Meta, r *csi.CapacityRange) error {
	switch {
	case old.Size < r.GetRequiredBytes() || (r.GetLimitBytes() > 0 && old.Size > r.GetLimitBytes()):
		return status.Errorf(codes.AlreadyExists, "volume %q exists with %d bytes, outside the requested range", old.Name, old.Size)
	case old.Encrypted != want.Encrypted || old.SectorSize != want.SectorSize || (old.Encrypted && old.KMSID != want.KMSID) ||
		old.AllowDiscards != want.AllowDiscards:
		return status.Errorf(codes.AlreadyExists, "volume %q exists with other parameters (encrypted %t, sectorSize %d, kmsID %q, allowDiscards %t)",
			old.Name, old.Encrypted, old.SectorSize, old.KMSID, old.AllowDiscards)
	case old.SourceSnapshotID != want.SourceSnapshotID || old.SourceVolumeID != want.SourceVolumeID:
		return status.Errorf(codes.AlreadyExists, "volume %q exists with another content source", old.Name)
	}
	return nil
}

// randomKeys returns a fresh volume key and passphrase, locked in memory
// where the OS allows. The caller zeroes and unlocks them.
func randomKeys() (vk, pass []byte, err error) {
	buf := make([]byte, volumeKeySize+passphraseSize)
	_ = unix.Mlock(buf)                                 // best effort: RLIMIT_MEMLOCK may refuse
	vk, pass = buf[:volumeKeySize], buf[volumeKeySize:] // vk keeps buf's capacity for zeroKeys
	for {
		if _, err := rand.Read(buf); err != nil {
			return nil, nil, fmt.Errorf("random key: %w", err)
		}
		// XTS refuses keys whose halves are equal; 2^-256, but checked.
		if subtle.ConstantTimeCompare(vk[:32], vk[32:]) == 0 {
			return vk, pass, nil
		}
	}
}

func zeroKeys(vk, pass []byte) {
	clear(vk)
	clear(pass)
	buf := vk[:volumeKeySize+passphraseSize]
	_ = unix.Munlock(buf)
}

// kmsUID is a random UID for a KMS request (tracing only).
func kmsUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// createEncrypted wraps a new passphrase with the KMS before touching the
// pool (so an unreachable KMS leaves nothing behind), then formats a LUKS2
// image with the wrapped passphrase as token 0.
func (c *ControllerServer) createEncrypted(ctx context.Context, pool backend.Pool, meta backend.Meta) (*backend.Meta, error) {
	kms, err := c.kms.Get(meta.KMSID)
	if err != nil {
		return nil, err
	}
	vk, pass, err := randomKeys()
	if err != nil {
		return nil, err
	}
	defer zeroKeys(vk, pass)
	token, err := kms.Wrap(ctx, kmsUID(), pass)
	if err != nil {
		return nil, err
	}
	return pool.Create(ctx, backend.CreateRequest{
		Meta:      meta,
		ImageSize: crypt.DefaultDataOffset + meta.Size,
		Build: func(_ context.Context, img backend.Image) error {
			_, err := crypt.Format(img, meta.Size, crypt.FormatOptions{
				SectorSize: meta.SectorSize,
				VolumeKey:  vk,
				Passphrase: pass,
				Token:      token,
				Label:      backend.ObjectID(backend.KindVolume, meta.Name),
				// Room for the largest token the KMS v2 API allows, now and
				// after any re-wrap.
				HeaderSize: crypt.KMSHeaderSize,
			})
			if err != nil {
				return fmt.Errorf("format LUKS2 image: %w", err)
			}
			return nil
		},
	})
}

// createFromSource copies a snapshot or volume (header and data, hence the
// same volume key) and grows the copy to the wanted size.
// imageSize is the header (of the source) plus the new capacity.
func (c *ControllerServer) createFromSource(ctx context.Context, meta backend.Meta, src *source, imageSize int64) (*backend.Meta, error) {
	return c.pool.Create(ctx, backend.CreateRequest{
		Meta:      meta,
		Source:    src.meta,
		ImageSize: imageSize,
		Build: func(_ context.Context, img backend.Image) error {
			if !meta.Encrypted {
				return nil
			}
			h, err := crypt.ReadHeader(img)
			if err != nil {
				return fmt.Errorf("header of the copy of %s: %w", src.meta.ID, err)
			}
			if _, ok := h.KMSToken(); !ok {
				return fmt.Errorf("the copy of %s has no KMS token", src.meta.ID)
			}
			return nil
		},
	})
}

// checkUnwraps makes sure that an encrypted source's token still unwraps
// (one Decrypt; the plaintext is zeroed at once), so that a restore or
// clone whose master key version was retired fails here, FailedPrecondition
// naming the key_id, rather than at NodeStageVolume.
func (c *ControllerServer) checkUnwraps(ctx context.Context, m *backend.Meta) error {
	tok, err := c.readToken(ctx, m)
	if err != nil {
		return err
	}
	kmsID := tok.KMSID
	if kmsID == "" {
		kmsID = m.KMSID
	}
	kms, err := c.kms.Get(kmsID)
	if err != nil {
		return err
	}
	pass, err := kms.Unwrap(ctx, kmsUID(), tok)
	clear(pass)
	return err
}

// readToken returns the KMS token of an encrypted object's header.
func (c *ControllerServer) readToken(ctx context.Context, m *backend.Meta) (*crypt.KMSToken, error) {
	return readTokenOf(ctx, c.pool, m)
}

// dataOffset reads the data offset of an encrypted object's header.
func (c *ControllerServer) dataOffset(ctx context.Context, m *backend.Meta) (int64, error) {
	f, err := c.pool.OpenImage(ctx, m.Kind, m.ID)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	h, err := crypt.ReadHeader(f)
	if err != nil {
		return 0, fmt.Errorf("header of %s %s: %w", m.Kind, m.ID, err)
	}
	return h.DataOffset(), nil
}

// shredder returns the hook that crypto-shreds an encrypted image before
// it is removed.
func shredder(m *backend.Meta) backend.BuildFunc {
	if !m.Encrypted {
		return nil
	}
	return func(_ context.Context, img backend.Image) error {
		if err := crypt.Wipe(img); err != nil {
			return fmt.Errorf("crypto-shred %s: %w", m.ID, err)
		}
		return nil
	}
}

// deleteDamaged removes an object whose metadata is damaged: the metadata
// cannot say whether it is encrypted, so its image is crypto-shredded when
// it carries a LUKS2 header.
func (c *ControllerServer) deleteDamaged(ctx context.Context, kind backend.Kind, id string, why error) error {
	klog.FromContext(ctx).Info("Deleting an object whose metadata is damaged", "kind", kind, "id", id, "reason", why.Error())
	shred := func(_ context.Context, img backend.Image) error {
		if _, err := crypt.ReadHeader(img); err != nil {
			return nil // no LUKS2 header we can read: nothing to shred
		}
		if err := crypt.Wipe(img); err != nil {
			return fmt.Errorf("crypto-shred %s: %w", id, err)
		}
		return nil
	}
	if err := c.pool.Delete(ctx, kind, id, shred); err != nil {
		return toStatus(err, "delete "+string(kind)+" "+id)
	}
	return nil
}

// DeleteVolume crypto-shreds an encrypted volume's header and keyslots,
// then removes its image. Snapshots keep their own copies.
func (c *ControllerServer) DeleteVolume(ctx context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, invalid("volume_id: must not be empty")
	}
	m, err := c.pool.Get(ctx, backend.KindVolume, id)
	if errors.Is(err, backend.ErrNotFound) {
		return &csi.DeleteVolumeResponse{}, nil
	}
	if errors.Is(err, backend.ErrCorrupt) {
		if err := c.deleteDamaged(ctx, backend.KindVolume, id, err); err != nil {
			return nil, err
		}
		return &csi.DeleteVolumeResponse{}, nil
	}
	if err != nil {
		return nil, toStatus(err, "DeleteVolume")
	}
	unlock, err := c.pool.Lock(ctx, backend.KindVolume, m.Name)
	if err != nil {
		return nil, toStatus(err, "DeleteVolume")
	}
	defer unlock()
	if err := c.pool.Delete(ctx, backend.KindVolume, id, shredder(m)); err != nil {
		if errors.Is(err, backend.ErrInUse) {
			// Staged on a node or opened with `volume open`: shredding it
			// would pull the key from under a live engine.
			return nil, status.Errorf(codes.FailedPrecondition, "DeleteVolume %s: volume in use (unstage it first): %v", id, err)
		}
		return nil, toStatus(err, "DeleteVolume "+id)
	}
	klog.FromContext(ctx).Info("Deleted volume", "volumeID", id, "name", m.Name, "shredded", m.Encrypted)
	return &csi.DeleteVolumeResponse{}, nil
}

// ValidateVolumeCapabilities confirms capabilities (and parameters, when
// given) that the volume supports.
func (c *ControllerServer) ValidateVolumeCapabilities(ctx context.Context, req *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, invalid("volume_id: must not be empty")
	}
	if len(req.GetVolumeCapabilities()) == 0 {
		return nil, invalid("volume_capabilities: at least one capability is required")
	}
	m, err := c.pool.Get(ctx, backend.KindVolume, id)
	if errors.Is(err, backend.ErrNotFound) {
		return nil, status.Errorf(codes.NotFound, "volume %q does not exist", id)
	}
	if err != nil {
		return nil, toStatus(err, "ValidateVolumeCapabilities")
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: status.Convert(err).Message()}, nil
	}
	if len(req.GetParameters()) > 0 {
		p, err := parseParams(req.GetParameters())
		if err != nil {
			return &csi.ValidateVolumeCapabilitiesResponse{Message: err.Error()}, nil
		}
		if p.EncryptedSet && p.Encrypted != m.Encrypted {
			return &csi.ValidateVolumeCapabilitiesResponse{Message: fmt.Sprintf("volume %s has encrypted=%t", id, m.Encrypted)}, nil
		}
	}
	return &csi.ValidateVolumeCapabilitiesResponse{Confirmed: &csi.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext:      req.GetVolumeContext(),
		VolumeCapabilities: req.GetVolumeCapabilities(),
		Parameters:         req.GetParameters(),
	}}, nil
}

// GetCapacity reports the free bytes of the pool (zero for a topology of
// another region).
func (c *ControllerServer) GetCapacity(ctx context.Context, req *csi.GetCapacityRequest) (*csi.GetCapacityResponse, error) {
	params := &volumeParams{Backend: BackendFile}
	if len(req.GetParameters()) > 0 {
		var err error
		if params, err = parseParams(req.GetParameters()); err != nil {
			return nil, invalid("%v", err)
		}
	}
	if len(req.GetVolumeCapabilities()) > 0 {
		if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
			return &csi.GetCapacityResponse{}, nil
		}
	}
	if t := req.GetAccessibleTopology(); t != nil && c.region != "" {
		if r, ok := t.GetSegments()[TopologyRegionKey]; ok && r != c.region {
			return &csi.GetCapacityResponse{}, nil
		}
	}
	pool, err := c.pool.target(params)
	if err != nil {
		return nil, toStatus(err, "GetCapacity")
	}
	free, err := pool.Capacity(ctx)
	if errors.Is(err, rbd.ErrNoCredentials) {
		// GetCapacity carries no secrets: the pool is known once another
		// call brought them.
		return nil, status.Errorf(codes.Unavailable, "GetCapacity: RBD pool %q: no call has brought its Ceph credentials yet", params.Pool)
	}
	if err != nil {
		return nil, toStatus(err, "GetCapacity")
	}
	return &csi.GetCapacityResponse{AvailableCapacity: free}, nil
}

// ControllerExpandVolume grows a volume's image; the node grows the
// engine, the loop device and the filesystem.
func (c *ControllerServer) ControllerExpandVolume(ctx context.Context, req *csi.ControllerExpandVolumeRequest) (*csi.ControllerExpandVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, invalid("volume_id: must not be empty")
	}
	if req.GetCapacityRange() == nil {
		return nil, invalid("capacity_range: must be set")
	}
	m, err := c.pool.Get(ctx, backend.KindVolume, id)
	if errors.Is(err, backend.ErrNotFound) {
		return nil, status.Errorf(codes.NotFound, "volume %q does not exist", id)
	}
	if err != nil {
		return nil, toStatus(err, "ControllerExpandVolume")
	}
	if vc := req.GetVolumeCapability(); vc != nil {
		if err := checkCapabilities([]*csi.VolumeCapability{vc}); err != nil {
			return nil, err
		}
	}
	unlock, err := c.pool.Lock(ctx, backend.KindVolume, m.Name)
	if err != nil {
		return nil, toStatus(err, "ControllerExpandVolume")
	}
	defer unlock()
	headerBytes := int64(0)
	if m.Encrypted {
		if headerBytes, err = c.dataOffset(ctx, m); err != nil {
			return nil, toStatus(err, "ControllerExpandVolume")
		}
	}
	size, err := wantedSize(req.GetCapacityRange(), 0, m.SectorSize, maxCapacity(headerBytes, m.SectorSize))
	if err != nil {
		return nil, err
	}
	if size <= m.Size {
		return &csi.ControllerExpandVolumeResponse{CapacityBytes: m.Size, NodeExpansionRequired: true}, nil
	}
	imageSize := headerBytes + size // both checked: at most MaxImageBytes
	m, err = c.pool.Resize(ctx, id, imageSize, size)
	if err != nil {
		return nil, toStatus(err, "ControllerExpandVolume "+id)
	}
	klog.FromContext(ctx).Info("Expanded volume", "volumeID", id, "size", m.Size)
	return &csi.ControllerExpandVolumeResponse{CapacityBytes: m.Size, NodeExpansionRequired: true}, nil
}

// ListVolumes pages through the volumes by ID.
func (c *ControllerServer) ListVolumes(ctx context.Context, req *csi.ListVolumesRequest) (*csi.ListVolumesResponse, error) {
	all, err := c.pool.List(ctx, backend.KindVolume)
	if err != nil {
		return nil, toStatus(err, "ListVolumes")
	}
	page, next, err := paginate(all, backend.KindVolume, req.GetStartingToken(), req.GetMaxEntries())
	if err != nil {
		return nil, err
	}
	resp := &csi.ListVolumesResponse{NextToken: next}
	for _, m := range page {
		resp.Entries = append(resp.Entries, &csi.ListVolumesResponse_Entry{Volume: c.csiVolume(m)})
	}
	return resp, nil
}

// paginate returns the entries from the one whose ID is the token on (IDs
// are sorted; a token whose entry was deleted meanwhile still continues in
// order), at most max of them, and the next token.
func paginate(all []*backend.Meta, kind backend.Kind, token string, maxEntries int32) ([]*backend.Meta, string, error) {
	if maxEntries < 0 {
		return nil, "", invalid("max_entries: must not be negative")
	}
	start := 0
	if token != "" {
		if !validObjectID(kind, token) {
			return nil, "", status.Errorf(codes.Aborted, "starting_token %q is not a token this driver issued", token)
		}
		for start < len(all) && all[start].ID < token {
			start++
		}
	}
	rest := all[start:]
	if maxEntries == 0 || int(maxEntries) >= len(rest) {
		return rest, "", nil
	}
	return rest[:maxEntries], rest[maxEntries].ID, nil
}

// csiSnapshot describes a snapshot.
func csiSnapshot(m *backend.Meta) *csi.Snapshot {
	return &csi.Snapshot{
		SnapshotId:     m.ID,
		SourceVolumeId: m.SourceVolumeID,
		SizeBytes:      m.Size,
		CreationTime:   timestamppb.New(m.CreatedAt),
		ReadyToUse:     true,
	}
}
