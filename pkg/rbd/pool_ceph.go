//go:build ceph

package rbd

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/ceph/go-ceph/rados"
	librbd "github.com/ceph/go-ceph/rbd"
	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/backend"
	"github.com/csi-encdisk/csi-encdisk/pkg/keyedlock"
)

// Layout of a Pool in its RBD pool:
//
//	image <id>            one per volume (vol-...) and snapshot (snap-...);
//	                      its metadata key "csi-encdisk.meta" holds backend.Meta
//	snapshot <id>@c-<child-id>  protected; the parent of the clone <child-id>
//	image tmp-<id>-<rand> an object being built: renamed to <id> when complete
//
// Snapshots, restores and clones are RBD clones (v1: the parent snapshot is
// protected first): O(1), and the clone carries its parent's LUKS2 header,
// hence its volume key. An image whose snapshots still have clones goes to
// the RBD trash when deleted; it is purged when its last clone goes.
const (
	metaKey    = "csi-encdisk.meta"
	tmpPrefix  = "tmp-"
	snapPrefix = "c-"
	// features of new images: layering only (no exclusive-lock: the
	// controller updates headers while an engine has the image open).
	imageFeatures = librbd.FeatureLayering
	imageOrder    = 22 // 4 MiB objects
)

// Pool is a backend.Pool in one RBD pool. Each call connects with the
// credentials its context carries (WithCredentials); the last connection
// that worked is kept for calls that carry none (ListVolumes, GetCapacity).
type Pool struct {
	pool     string
	locks    *keyedlock.Locks
	mu       sync.Mutex
	conn     *rados.Conn
	connUser string            // user and monitors of conn
	connKey  [sha256.Size]byte // SHA-256 of its key: the key itself is not kept (it cannot be wiped from a string)
}

var _ backend.Pool = (*Pool)(nil)

// NewPool returns a Pool on the RBD pool name. It connects on first use.
func NewPool(name string) (*Pool, error) {
	if !ValidPoolName(name) {
		return nil, fmt.Errorf("rbd: pool name %q: want 1-128 letters, digits, '_', '.', '-'", name)
	}
	return &Pool{pool: name, locks: keyedlock.New()}, nil
}

// Name is the RBD pool's name.
func (p *Pool) Name() string { return p.pool }

// Close drops the cached connection.
func (p *Pool) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.conn != nil {
		p.conn.Shutdown()
		p.conn = nil
	}
}

// ioctx returns an I/O context on the pool, connecting with ctx's
// credentials (or the cached connection).
func (p *Pool) ioctx(ctx context.Context) (*rados.IOContext, error) {
	c := CredentialsFrom(ctx)
	p.mu.Lock()
	defer p.mu.Unlock()
	if c != nil {
		id := c.User + "\x00" + c.Monitors
		sum := sha256.Sum256(c.Key)
		if p.conn == nil || p.connUser != id || subtle.ConstantTimeCompare(p.connKey[:], sum[:]) != 1 {
			conn, err := Connect(ctx, c, true)
			if err != nil {
				return nil, err
			}
			if p.conn != nil {
				p.conn.Shutdown()
			}
			p.conn, p.connUser, p.connKey = conn, id, sum
		}
	}
	if p.conn == nil {
		return nil, fmt.Errorf("%w: %w", ErrUnavailable, ErrNoCredentials)
	}
	io, err := p.conn.OpenIOContext(p.pool)
	if err != nil {
		return nil, fmt.Errorf("rbd: open pool %q: %w", p.pool, mapErr(err))
	}
	return io, nil
}

// ID implements backend.Pool.
func (p *Pool) ID(kind backend.Kind, name string) string { return backend.ObjectID(kind, name) }

// Lock implements backend.Pool (within this process; the CSI controller is
// one process).
func (p *Pool) Lock(ctx context.Context, kind backend.Kind, name string) (func(), error) {
	return p.locks.Lock(ctx, string(kind)+"/"+name)
}

func checkID(kind backend.Kind, id string) error {
	if !backend.ValidID(kind, id) {
		return fmt.Errorf("%w: %q is not a %s ID of this pool", backend.ErrNotFound, id, kind)
	}
	return nil
}

// Create implements backend.Pool.
func (p *Pool) Create(ctx context.Context, req backend.CreateRequest) (*backend.Meta, error) {
	meta := req.Meta
	if meta.Kind != backend.KindVolume && meta.Kind != backend.KindSnapshot {
		return nil, fmt.Errorf("rbd: unknown kind %q", meta.Kind)
	}
	meta.ID = backend.ObjectID(meta.Kind, meta.Name)
	if old, err := p.Get(ctx, meta.Kind, meta.ID); err == nil {
		return old, fmt.Errorf("%w: %s %s", backend.ErrExists, meta.Kind, meta.ID)
	} else if !errors.Is(err, backend.ErrNotFound) {
		return nil, err
	}
	io, err := p.ioctx(ctx)
	if err != nil {
		return nil, err
	}
	defer io.Destroy()
	if err := p.checkQuota(ctx, io, req.ImageSize); err != nil {
		return nil, err
	}
	tmp := tmpPrefix + meta.ID + "-" + randomSuffix()
	var parentSnap *librbd.Snapshot // the snapshot cloned, removed again on failure
	done := false
	defer func() {
		if done {
			return
		}
		if err := removeImage(io, tmp); err != nil && !isErrno(err, syscall.ENOENT) {
			klog.FromContext(ctx).Error(err, "Removing a half-made image failed", "image", tmp)
		}
		if parentSnap != nil {
			_ = parentSnap.Unprotect()
			_ = parentSnap.Remove()
		}
	}()
	if req.Source != nil {
		parentSnap, err = p.cloneInto(io, req.Source, meta.ID, tmp)
		if err != nil {
			return nil, err
		}
	} else {
		opts := librbd.NewRbdImageOptions()
		defer opts.Destroy()
		_ = opts.SetUint64(librbd.ImageOptionFeatures, imageFeatures)
		_ = opts.SetUint64(librbd.ImageOptionOrder, imageOrder)
		if err := librbd.CreateImage(io, tmp, uint64(max(req.ImageSize, 0)), opts); err != nil {
			return nil, fmt.Errorf("rbd: create image %s/%s: %w", p.pool, tmp, mapErr(err))
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	img, err := librbd.OpenImage(io, tmp, librbd.NoSnapshot)
	if err != nil {
		return nil, fmt.Errorf("rbd: open %s: %w", tmp, mapErr(err))
	}
	h := &Image{img: img, name: p.pool + "/" + tmp}
	err = func() error {
		size, err := h.Size()
		if err != nil {
			return err
		}
		if req.ImageSize > size {
			if err := h.Truncate(req.ImageSize); err != nil {
				return fmt.Errorf("rbd: size %s to %d bytes: %w", tmp, req.ImageSize, err)
			}
		}
		if req.Build != nil {
			if err := req.Build(ctx, h); err != nil {
				return err
			}
		}
		if meta.ImageSize, err = h.Size(); err != nil {
			return err
		}
		if err := h.Sync(); err != nil {
			return fmt.Errorf("rbd: flush %s: %w", tmp, err)
		}
		meta.CreatedAt = time.Now().UTC().Truncate(time.Microsecond)
		b, err := json.Marshal(&meta)
		if err != nil {
			return fmt.Errorf("rbd: encode metadata: %w", err)
		}
		if err := img.SetMetadata(metaKey, string(b)); err != nil {
			return fmt.Errorf("rbd: store metadata of %s: %w", tmp, mapErr(err))
		}
		return ctx.Err()
	}()
	if cerr := h.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, err
	}
	if err := librbd.GetImage(io, tmp).Rename(meta.ID); err != nil {
		return nil, fmt.Errorf("rbd: move %s into place: %w", meta.ID, mapErr(err))
	}
	done = true
	return &meta, nil
}

// cloneInto makes image dst a copy-on-write clone of src through the
// protected snapshot src@c-<childID> (made here, or left by an earlier try).
func (p *Pool) cloneInto(io *rados.IOContext, src *backend.Meta, childID, dst string) (*librbd.Snapshot, error) {
	parent, err := librbd.OpenImage(io, src.ID, librbd.NoSnapshot)
	if err != nil {
		if isErrno(err, syscall.ENOENT) {
			return nil, fmt.Errorf("%w: %s %s", backend.ErrNotFound, src.Kind, src.ID)
		}
		return nil, fmt.Errorf("rbd: open %s: %w", src.ID, mapErr(err))
	}
	defer parent.Close()
	name := snapPrefix + childID
	snap := parent.GetSnapshot(name)
	if _, err := parent.CreateSnapshot(name); err != nil && !isErrno(err, syscall.EEXIST) {
		return nil, fmt.Errorf("rbd: snapshot %s@%s: %w", src.ID, name, mapErr(err))
	}
	if prot, err := snap.IsProtected(); err != nil || !prot {
		if err := snap.Protect(); err != nil && !isErrno(err, syscall.EBUSY) {
			_ = snap.Remove()
			return nil, fmt.Errorf("rbd: protect %s@%s: %w", src.ID, name, mapErr(err))
		}
	}
	opts := librbd.NewRbdImageOptions()
	defer opts.Destroy()
	_ = opts.SetUint64(librbd.ImageOptionFeatures, imageFeatures)
	_ = opts.SetUint64(librbd.ImageOptionOrder, imageOrder)
	if err := librbd.CloneImage(io, src.ID, name, io, dst, opts); err != nil {
		_ = snap.Unprotect()
		_ = snap.Remove()
		return nil, fmt.Errorf("rbd: clone %s@%s: %w", src.ID, name, mapErr(err))
	}
	return snap, nil
}

// Get implements backend.Pool.
func (p *Pool) Get(ctx context.Context, kind backend.Kind, id string) (*backend.Meta, error) {
	if err := checkID(kind, id); err != nil {
		return nil, err
	}
	io, err := p.ioctx(ctx)
	if err != nil {
		return nil, err
	}
	defer io.Destroy()
	return p.get(io, kind, id)
}

func (p *Pool) get(io *rados.IOContext, kind backend.Kind, id string) (*backend.Meta, error) {
	img, err := librbd.OpenImageReadOnly(io, id, librbd.NoSnapshot)
	if isErrno(err, syscall.ENOENT) {
		return nil, fmt.Errorf("%w: %s %s", backend.ErrNotFound, kind, id)
	}
	if err != nil {
		return nil, fmt.Errorf("rbd: open %s: %w", id, mapErr(err))
	}
	defer img.Close()
	raw, err := img.GetMetadata(metaKey)
	if isErrno(err, syscall.ENOENT) {
		return nil, fmt.Errorf("%w: %s %s: no %s metadata", backend.ErrCorrupt, kind, id, metaKey)
	}
	if err != nil {
		return nil, fmt.Errorf("rbd: metadata of %s: %w", id, mapErr(err))
	}
	return parseMeta(raw, kind, id)
}

// parseMeta decodes the metadata of object id of kind and checks that it
// describes that object.
func parseMeta(raw string, kind backend.Kind, id string) (*backend.Meta, error) {
	var m backend.Meta
	if err := json.Unmarshal([]byte(raw), &m); err != nil {
		return nil, fmt.Errorf("%w: %s %s: %s: %v", backend.ErrCorrupt, kind, id, metaKey, err)
	}
	if m.ID != id || m.Kind != kind || m.Name == "" || m.ImageSize < m.Size {
		return nil, fmt.Errorf("%w: %s %s: %s does not describe this object", backend.ErrCorrupt, kind, id, metaKey)
	}
	return &m, nil
}

// Meta returns the metadata the controller recorded on this volume image
// (its key csi-encdisk.meta): whether the volume is encrypted, its sector
// size, ... An image without it (made by hand) is an error wrapping
// backend.ErrNotFound; one whose metadata names another object or kind,
// backend.ErrCorrupt.
// formattedKey is the image metadata key that records that the node made a
// filesystem on the volume once (the RBD form of the file pool's xattr).
const formattedKey = "csi-encdisk.formatted"

// Formatted reports whether the image records that its volume was formatted.
func (i *Image) Formatted() (bool, error) {
	_, err := i.img.GetMetadata(formattedKey)
	if isErrno(err, syscall.ENOENT) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("rbd: metadata of %s: %w", i.name, mapErr(err))
	}
	return true, nil
}

// MarkFormatted records on the image that its volume was formatted (the
// time, for people).
func (i *Image) MarkFormatted() error {
	if err := i.img.SetMetadata(formattedKey, time.Now().UTC().Format(time.RFC3339)); err != nil {
		return fmt.Errorf("rbd: metadata of %s: %w", i.name, mapErr(err))
	}
	return nil
}

func (i *Image) Meta() (*backend.Meta, error) {
	raw, err := i.img.GetMetadata(metaKey)
	if isErrno(err, syscall.ENOENT) {
		return nil, fmt.Errorf("%w: image %s has no %s metadata", backend.ErrNotFound, i.name, metaKey)
	}
	if err != nil {
		return nil, fmt.Errorf("rbd: metadata of %s: %w", i.name, mapErr(err))
	}
	return parseMeta(raw, backend.KindVolume, i.img.GetName())
}

// List implements backend.Pool.
func (p *Pool) List(ctx context.Context, kind backend.Kind) ([]*backend.Meta, error) {
	io, err := p.ioctx(ctx)
	if err != nil {
		return nil, err
	}
	defer io.Destroy()
	names, err := librbd.GetImageNames(io)
	if err != nil {
		return nil, fmt.Errorf("rbd: list images of %s: %w", p.pool, mapErr(err))
	}
	var out []*backend.Meta
	for _, n := range names {
		if !backend.ValidID(kind, n) {
			continue
		}
		m, err := p.get(io, kind, n)
		if errors.Is(err, backend.ErrNotFound) {
			continue
		}
		if err != nil {
			klog.FromContext(ctx).Error(err, "Skipping an unreadable object of the pool", "kind", kind, "id", n)
			continue
		}
		out = append(out, m)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

// Delete implements backend.Pool: shred (in place, through librbd), then
// remove the image, or move it to the trash while clones of its snapshots
// live; then release the snapshot of its parent it was cloned from (and the
// parent itself, if it waits in the trash for its last clone).
func (p *Pool) Delete(ctx context.Context, kind backend.Kind, id string, shred backend.BuildFunc) error {
	if !backend.ValidID(kind, id) {
		return nil
	}
	io, err := p.ioctx(ctx)
	if err != nil {
		return err
	}
	defer io.Destroy()
	img, err := librbd.OpenImage(io, id, librbd.NoSnapshot)
	if isErrno(err, syscall.ENOENT) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("rbd: open %s: %w", id, mapErr(err))
	}
	// Never shred what a node still serves: an engine holds a watch on the
	// image's header for as long as it has the image open (as does a client
	// that died, until its session times out, about 30 s).
	if err := p.refuseWatched(img, id); err != nil {
		img.Close()
		return err
	}
	h := &Image{img: img, name: p.pool + "/" + id}
	if shred != nil {
		if err := shred(ctx, h); err != nil {
			img.Close()
			return err
		}
	}
	if err := ctx.Err(); err != nil {
		img.Close()
		return err
	}
	parent, _ := img.GetParent() // nil for an image that is no clone
	busy, err := dropFreeSnapshots(img)
	if err != nil {
		img.Close()
		return err
	}
	if busy {
		err = img.Trash(0)
		img.Close()
		if err != nil {
			return fmt.Errorf("rbd: move %s to the trash: %w", id, mapErr(err))
		}
		// Still a clone of its parent's snapshot: released with the purge.
		klog.FromContext(ctx).Info("Image has clones: moved to the RBD trash until the last one goes", "id", id)
		return nil
	} else {
		img.Close()
		if err := removeImage(io, id); err != nil && !isErrno(err, syscall.ENOENT) {
			return err
		}
	}
	if parent != nil {
		p.release(ctx, io, parent.Image.ImageID, snapPrefix+id)
	}
	return nil
}

// refuseWatched fails with backend.ErrInUse when a client other than this
// controller watches img (ours registers a watch too, by opening it).
func (p *Pool) refuseWatched(img *librbd.Image, id string) error {
	ws, err := img.ListWatchers()
	if err != nil {
		return fmt.Errorf("rbd: watchers of %s: %w", id, mapErr(err))
	}
	self := p.instanceID()
	var others []string
	for _, w := range ws {
		if uint64(w.Id) != self {
			others = append(others, fmt.Sprintf("client.%d at %s", w.Id, w.Addr))
		}
	}
	if len(others) > 0 {
		return fmt.Errorf("rbd: %s/%s: %w: watched by %s (a node serves it, or a client that died less than about 30 s ago)",
			p.pool, id, backend.ErrInUse, strings.Join(others, ", "))
	}
	return nil
}

// instanceID is the global ID of this pool's cluster connection (0: none).
func (p *Pool) instanceID() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.conn == nil {
		return 0
	}
	return p.conn.GetInstanceID()
}

// dropFreeSnapshots removes the snapshots of img without clones; it reports
// whether some have clones.
func dropFreeSnapshots(img *librbd.Image) (busy bool, err error) {
	snaps, err := img.GetSnapshotNames()
	if err != nil {
		return false, fmt.Errorf("rbd: snapshots of %s: %w", img.GetName(), mapErr(err))
	}
	for _, s := range snaps {
		snap := img.GetSnapshot(s.Name)
		if prot, _ := snap.IsProtected(); prot {
			if err := snap.Unprotect(); err != nil {
				if isErrno(err, syscall.EBUSY) {
					busy = true
					continue
				}
				return false, fmt.Errorf("rbd: unprotect %s@%s: %w", img.GetName(), s.Name, mapErr(err))
			}
		}
		if err := snap.Remove(); err != nil {
			return false, fmt.Errorf("rbd: remove %s@%s: %w", img.GetName(), s.Name, mapErr(err))
		}
	}
	return busy, nil
}

// release removes snapshot snapName of the image with RBD id parentID (its
// clone is gone); a parent in the trash without clones left is purged, and
// so on up its own parents.
func (p *Pool) release(ctx context.Context, io *rados.IOContext, parentID, snapName string) {
	log := klog.FromContext(ctx)
	img, err := librbd.OpenImageById(io, parentID, librbd.NoSnapshot)
	if err != nil {
		log.Error(mapErr(err), "Releasing the parent snapshot: open parent failed", "parentID", parentID)
		return
	}
	snap := img.GetSnapshot(snapName)
	if err := snap.Unprotect(); err == nil || isErrno(err, syscall.EINVAL) {
		if err := snap.Remove(); err != nil && !isErrno(err, syscall.ENOENT) {
			log.Error(mapErr(err), "Removing the parent snapshot failed", "parentID", parentID, "snapshot", snapName)
		}
	} else if !isErrno(err, syscall.ENOENT) {
		log.Error(mapErr(err), "Unprotecting the parent snapshot failed", "parentID", parentID, "snapshot", snapName)
	}
	inTrash, trashedName := false, ""
	if trash, err := librbd.GetTrashList(io); err == nil {
		for _, t := range trash {
			if t.Id == parentID {
				inTrash, trashedName = true, t.Name
			}
		}
	}
	if !inTrash {
		img.Close()
		return
	}
	grand, _ := img.GetParent()
	busy, err := dropFreeSnapshots(img)
	img.Close()
	if err != nil || busy {
		return
	}
	if err := librbd.TrashRemove(io, parentID, true); err != nil {
		log.Error(mapErr(err), "Purging a parent from the trash failed", "parentID", parentID)
		return
	}
	if grand != nil {
		// The snapshot of the grandparent is named after the parent.
		p.release(ctx, io, grand.Image.ImageID, snapPrefix+trashedName)
	}
}

func removeImage(io *rados.IOContext, name string) error {
	if err := librbd.RemoveImage(io, name); err != nil {
		return fmt.Errorf("rbd: remove %s: %w", name, mapErr(err))
	}
	return nil
}

// Resize implements backend.Pool.
func (p *Pool) Resize(ctx context.Context, id string, imageSize, size int64) (*backend.Meta, error) {
	io, err := p.ioctx(ctx)
	if err != nil {
		return nil, err
	}
	defer io.Destroy()
	m, err := p.get(io, backend.KindVolume, id)
	if err != nil {
		return nil, err
	}
	if err := p.checkQuota(ctx, io, 0); err != nil {
		return nil, err
	}
	img, err := librbd.OpenImage(io, id, librbd.NoSnapshot)
	if err != nil {
		return nil, fmt.Errorf("rbd: open %s: %w", id, mapErr(err))
	}
	defer img.Close()
	cur, err := img.GetSize()
	if err != nil {
		return nil, mapErr(err)
	}
	if imageSize > int64(cur) {
		if err := img.Resize(uint64(imageSize)); err != nil {
			return nil, fmt.Errorf("rbd: grow %s to %d bytes: %w", id, imageSize, mapErr(err))
		}
		m.ImageSize = imageSize
	}
	m.Size = max(m.Size, size)
	b, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	if err := img.SetMetadata(metaKey, string(b)); err != nil {
		return nil, fmt.Errorf("rbd: store metadata of %s: %w", id, mapErr(err))
	}
	return m, nil
}

func (p *Pool) open(ctx context.Context, kind backend.Kind, id string, readOnly bool) (backend.Image, error) {
	if err := checkID(kind, id); err != nil {
		return nil, err
	}
	io, err := p.ioctx(ctx)
	if err != nil {
		return nil, err
	}
	var img *librbd.Image
	if readOnly {
		img, err = librbd.OpenImageReadOnly(io, id, librbd.NoSnapshot)
	} else {
		img, err = librbd.OpenImage(io, id, librbd.NoSnapshot)
	}
	if err != nil {
		io.Destroy()
		if isErrno(err, syscall.ENOENT) {
			return nil, fmt.Errorf("%w: %s %s", backend.ErrNotFound, kind, id)
		}
		return nil, fmt.Errorf("rbd: open %s: %w", id, mapErr(err))
	}
	return &Image{img: img, name: p.pool + "/" + id, closer: io.Destroy}, nil
}

// OpenImage implements backend.Pool.
func (p *Pool) OpenImage(ctx context.Context, kind backend.Kind, id string) (backend.Image, error) {
	return p.open(ctx, kind, id, true)
}

// OpenImageForUpdate implements backend.Pool.
func (p *Pool) OpenImageForUpdate(ctx context.Context, kind backend.Kind, id string) (backend.Image, error) {
	return p.open(ctx, kind, id, false)
}

// ImagePath implements backend.Pool: the engine's reference "rbd:POOL/ID".
func (p *Pool) ImagePath(volumeID string) (string, error) {
	if err := checkID(backend.KindVolume, volumeID); err != nil {
		return "", err
	}
	return Ref{Pool: p.pool, Image: volumeID}.String(), nil
}

// quota is the pool's quota and use (`ceph osd pool get-quota`).
type quota struct {
	MaxBytes     int64 `json:"quota_max_bytes"`
	MaxObjects   int64 `json:"quota_max_objects"`
	CurrentBytes int64 `json:"current_num_bytes"`
	CurrentObjs  int64 `json:"current_num_objects"`
}

func (p *Pool) quota() (*quota, error) {
	p.mu.Lock()
	conn := p.conn
	p.mu.Unlock()
	if conn == nil {
		return nil, ErrNoCredentials
	}
	cmd, _ := json.Marshal(map[string]string{"prefix": "osd pool get-quota", "pool": p.pool, "format": "json"})
	out, info, err := conn.MonCommand(cmd)
	if err != nil {
		return nil, fmt.Errorf("rbd: quota of pool %s: %w (%s)", p.pool, mapErr(err), strings.TrimSpace(info))
	}
	var q quota
	if err := json.Unmarshal(out, &q); err != nil {
		return nil, fmt.Errorf("rbd: quota of pool %s: %w", p.pool, err)
	}
	return &q, nil
}

// checkQuota fails with EDQUOT when the pool's quota is reached: writes
// would wait forever (or until the OSD timeout) otherwise.
func (p *Pool) checkQuota(ctx context.Context, _ *rados.IOContext, _ int64) error {
	q, err := p.quota()
	if err != nil {
		klog.FromContext(ctx).V(2).Info("Pool quota unknown", "pool", p.pool, "err", err.Error())
		return nil
	}
	if (q.MaxBytes > 0 && q.CurrentBytes >= q.MaxBytes) || (q.MaxObjects > 0 && q.CurrentObjs >= q.MaxObjects) {
		return fmt.Errorf("rbd: pool %s is at its quota (%d of %d bytes, %d of %d objects): %w",
			p.pool, q.CurrentBytes, q.MaxBytes, q.CurrentObjs, q.MaxObjects, syscall.EDQUOT)
	}
	return nil
}

// Capacity implements backend.Pool: the cluster's free bytes, or what is
// left of the pool's byte quota if that is less.
func (p *Pool) Capacity(ctx context.Context) (int64, error) {
	io, err := p.ioctx(ctx)
	if err != nil {
		return 0, err
	}
	defer io.Destroy()
	p.mu.Lock()
	st, err := p.conn.GetClusterStats()
	p.mu.Unlock()
	if err != nil {
		return 0, fmt.Errorf("rbd: cluster stats: %w", mapErr(err))
	}
	free := int64(st.Kb_avail) * 1024
	if q, err := p.quota(); err == nil && q.MaxBytes > 0 {
		free = min(free, max(q.MaxBytes-q.CurrentBytes, 0))
	}
	return free, nil
}

// CheckWritable implements backend.Pool: it writes and removes an object.
func (p *Pool) CheckWritable(ctx context.Context) error {
	io, err := p.ioctx(ctx)
	if err != nil {
		return err
	}
	defer io.Destroy()
	obj := "csi-encdisk-probe-" + randomSuffix()
	if err := io.WriteFull(obj, []byte("probe")); err != nil {
		return fmt.Errorf("rbd: pool %s is not writable: %w", p.pool, mapErr(err))
	}
	_ = io.Delete(obj)
	return nil
}
