package driver

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"

	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/backend"
	"github.com/csi-encdisk/csi-encdisk/pkg/rbd"
)

// Backends of the StorageClass parameter "backend".
const (
	BackendFile = "file"
	BackendRBD  = "rbd"
)

// rbdIDPrefix starts the ID of every object in a Ceph RBD pool:
// "rbd-POOL-vol-<hex>" and "rbd-POOL-snap-<hex>". File pool IDs keep their
// form ("vol-<hex>", "snap-<hex>"), so IDs issued before RBD existed stay
// valid.
const rbdIDPrefix = "rbd-"

// errNoCephBuild is why a build without the Ceph backend cannot reach an RBD
// object.
var errNoCephBuild = errors.New("this build of csi-encdisk has no Ceph support (build with -tags ceph,pacific)")

// maxRBDPoolName keeps an RBD object's ID within 128 bytes.
const maxRBDPoolName = 64

// splitRBDID splits an RBD object ID into its pool and the ID inside the
// pool; ok is false for any other string.
func splitRBDID(kind backend.Kind, id string) (pool, inner string, ok bool) {
	rest, ok := strings.CutPrefix(id, rbdIDPrefix)
	if !ok {
		return "", "", false
	}
	n := len(backend.ObjectID(kind, ""))
	if len(rest) < n+2 || rest[len(rest)-n-1] != '-' {
		return "", "", false
	}
	pool, inner = rest[:len(rest)-n-1], rest[len(rest)-n:]
	if !backend.ValidID(kind, inner) || !validRBDPool(pool) {
		return "", "", false
	}
	return pool, inner, true
}

// rbdPoolOfID is the RBD pool an object ID of either kind names, or "".
func rbdPoolOfID(id string) string {
	for _, k := range []backend.Kind{backend.KindVolume, backend.KindSnapshot} {
		if pool, _, ok := splitRBDID(k, id); ok {
			return pool
		}
	}
	return ""
}

func validRBDPool(name string) bool { return len(name) <= maxRBDPoolName && rbd.ValidPoolName(name) }

// validObjectID reports whether id is an ID of kind that this driver issues
// (file pool or RBD).
func validObjectID(kind backend.Kind, id string) bool {
	if backend.ValidID(kind, id) {
		return true
	}
	_, _, ok := splitRBDID(kind, id)
	return ok
}

// location names where an object lives: "file" or "rbd/POOL".
func location(id string) string {
	if p := rbdPoolOfID(id); p != "" {
		return BackendRBD + "/" + p
	}
	return BackendFile
}

func paramsLocation(p *volumeParams) string {
	if p.Backend == BackendRBD {
		return BackendRBD + "/" + p.Pool
	}
	return BackendFile
}

// pools routes every call on an object to the store its ID names: the file
// pool, or one RBD pool per name (made on first use; each connects with the
// credentials of the call's context). It is a backend.Pool for everything
// addressed by ID; names share one lock space (the file pool's), and
// Create goes where the request's source lives (a new object with no source
// goes to the file pool: use target for those). Capacity and CheckWritable
// are the file pool's.
type pools struct {
	file backend.Pool
	mu   sync.Mutex
	rbd  map[string]*rbdPool
}

var _ backend.Pool = (*pools)(nil)

func newPools(file backend.Pool) *pools {
	return &pools{file: file, rbd: map[string]*rbdPool{}}
}

// rbdPool returns the RBD pool name, making it on first use.
func (p *pools) rbdPool(name string) (*rbdPool, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if rp, ok := p.rbd[name]; ok {
		return rp, nil
	}
	inner, err := newRBDPool(name)
	if err != nil {
		return nil, err
	}
	rp := &rbdPool{inner: inner, prefix: rbdIDPrefix + name + "-"}
	p.rbd[name] = rp
	return rp, nil
}

// target is the pool a new volume with these parameters goes to.
func (p *pools) target(params *volumeParams) (backend.Pool, error) {
	if params.Backend != BackendRBD {
		return p.file, nil
	}
	return p.rbdPool(params.Pool)
}

// byID is the pool that holds the object id of any kind.
func (p *pools) byID(id string) (backend.Pool, error) {
	if name := rbdPoolOfID(id); name != "" {
		return p.rbdPool(name)
	}
	return p.file, nil
}

// close drops the RBD pools' connections.
func (p *pools) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, rp := range p.rbd {
		if c, ok := rp.inner.(interface{ Close() }); ok {
			c.Close()
		}
	}
}

// ID implements backend.Pool: the file pool's ID (see target).
func (p *pools) ID(kind backend.Kind, name string) string { return p.file.ID(kind, name) }

// Lock implements backend.Pool: one lock space for every store.
func (p *pools) Lock(ctx context.Context, kind backend.Kind, name string) (func(), error) {
	return p.file.Lock(ctx, kind, name)
}

// Create implements backend.Pool: into the source's pool, else the file pool.
func (p *pools) Create(ctx context.Context, req backend.CreateRequest) (*backend.Meta, error) {
	if req.Source == nil {
		return p.file.Create(ctx, req)
	}
	pool, err := p.byID(req.Source.ID)
	if err != nil {
		return nil, err
	}
	return pool.Create(ctx, req)
}

// Get implements backend.Pool.
func (p *pools) Get(ctx context.Context, kind backend.Kind, id string) (*backend.Meta, error) {
	pool, err := p.byID(id)
	if err != nil {
		return nil, err
	}
	return pool.Get(ctx, kind, id)
}

// List implements backend.Pool: every store's objects, sorted by ID. An RBD
// pool that no call of this process has reached with credentials yet is
// left out (logged): list calls carry no secrets.
func (p *pools) List(ctx context.Context, kind backend.Kind) ([]*backend.Meta, error) {
	all, err := p.file.List(ctx, kind)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	rbds := make([]*rbdPool, 0, len(p.rbd))
	for _, rp := range p.rbd {
		rbds = append(rbds, rp)
	}
	p.mu.Unlock()
	for _, rp := range rbds {
		l, err := rp.List(ctx, kind)
		if errors.Is(err, rbd.ErrNoCredentials) {
			klog.FromContext(ctx).V(2).Info("RBD pool not listed: no call has brought its credentials yet", "pool", strings.TrimSuffix(strings.TrimPrefix(rp.prefix, rbdIDPrefix), "-"))
			continue
		}
		if err != nil {
			return nil, err
		}
		all = append(all, l...)
	}
	sort.Slice(all, func(i, j int) bool { return all[i].ID < all[j].ID })
	return all, nil
}

// Delete implements backend.Pool.
func (p *pools) Delete(ctx context.Context, kind backend.Kind, id string, shred backend.BuildFunc) error {
	pool, err := p.byID(id)
	if err != nil {
		return err
	}
	return pool.Delete(ctx, kind, id, shred)
}

// Resize implements backend.Pool.
func (p *pools) Resize(ctx context.Context, id string, imageSize, size int64) (*backend.Meta, error) {
	pool, err := p.byID(id)
	if err != nil {
		return nil, err
	}
	return pool.Resize(ctx, id, imageSize, size)
}

// OpenImage implements backend.Pool.
func (p *pools) OpenImage(ctx context.Context, kind backend.Kind, id string) (backend.Image, error) {
	pool, err := p.byID(id)
	if err != nil {
		return nil, err
	}
	return pool.OpenImage(ctx, kind, id)
}

// OpenImageForUpdate implements backend.Pool.
func (p *pools) OpenImageForUpdate(ctx context.Context, kind backend.Kind, id string) (backend.Image, error) {
	pool, err := p.byID(id)
	if err != nil {
		return nil, err
	}
	return pool.OpenImageForUpdate(ctx, kind, id)
}

// ImagePath implements backend.Pool: an image file of the file pool, or
// "rbd:POOL/IMAGE" (worked out from the ID alone: the node needs no RBD pool,
// and a build without Ceph support says so when the engine starts).
func (p *pools) ImagePath(volumeID string) (string, error) {
	if strings.HasPrefix(volumeID, rbdIDPrefix) {
		pool, inner, ok := splitRBDID(backend.KindVolume, volumeID)
		if !ok {
			return "", fmt.Errorf("%w: %q is not a volume ID of this driver", backend.ErrNotFound, volumeID)
		}
		return rbd.Ref{Pool: pool, Image: inner}.String(), nil
	}
	return p.file.ImagePath(volumeID)
}

// Capacity implements backend.Pool (the file pool's).
func (p *pools) Capacity(ctx context.Context) (int64, error) { return p.file.Capacity(ctx) }

// CheckWritable implements backend.Pool (the file pool's).
func (p *pools) CheckWritable(ctx context.Context) error { return p.file.CheckWritable(ctx) }

// rbdPool is one RBD pool seen with the driver's IDs: the pool's own IDs
// ("vol-<hex>") get the prefix "rbd-POOL-" on the way out, lose it on the
// way in (metadata in the pool keeps its own IDs).
type rbdPool struct {
	inner  backend.Pool
	prefix string
}

var _ backend.Pool = (*rbdPool)(nil)

func (r *rbdPool) in(id string) (string, bool) {
	inner, ok := strings.CutPrefix(id, r.prefix)
	return inner, ok
}

func (r *rbdPool) notHere(kind backend.Kind, id string) error {
	return fmt.Errorf("%w: %q is not a %s ID of RBD pool %s", backend.ErrNotFound, id, kind, strings.TrimSuffix(strings.TrimPrefix(r.prefix, rbdIDPrefix), "-"))
}

// out returns a copy of m with the driver's IDs.
func (r *rbdPool) out(m *backend.Meta) *backend.Meta {
	if m == nil {
		return nil
	}
	c := *m
	c.ID = r.prefix + m.ID
	if c.SourceVolumeID != "" {
		c.SourceVolumeID = r.prefix + c.SourceVolumeID
	}
	if c.SourceSnapshotID != "" {
		c.SourceSnapshotID = r.prefix + c.SourceSnapshotID
	}
	return &c
}

// strip returns a copy of m with the pool's own IDs.
func (r *rbdPool) strip(m *backend.Meta) *backend.Meta {
	c := *m
	c.ID, _ = r.in(m.ID)
	c.SourceVolumeID, _ = r.in(m.SourceVolumeID)
	c.SourceSnapshotID, _ = r.in(m.SourceSnapshotID)
	return &c
}

func (r *rbdPool) ID(kind backend.Kind, name string) string { return r.prefix + r.inner.ID(kind, name) }

func (r *rbdPool) Lock(ctx context.Context, kind backend.Kind, name string) (func(), error) {
	return r.inner.Lock(ctx, kind, name)
}

func (r *rbdPool) Create(ctx context.Context, req backend.CreateRequest) (*backend.Meta, error) {
	req.Meta = *r.strip(&req.Meta)
	if req.Source != nil {
		if _, ok := r.in(req.Source.ID); !ok {
			return nil, fmt.Errorf("%w: source %s is not in RBD pool %s", backend.ErrNotFound, req.Source.ID, r.prefix)
		}
		req.Source = r.strip(req.Source)
	}
	m, err := r.inner.Create(ctx, req)
	return r.out(m), err
}

func (r *rbdPool) Get(ctx context.Context, kind backend.Kind, id string) (*backend.Meta, error) {
	inner, ok := r.in(id)
	if !ok {
		return nil, r.notHere(kind, id)
	}
	m, err := r.inner.Get(ctx, kind, inner)
	return r.out(m), err
}

func (r *rbdPool) List(ctx context.Context, kind backend.Kind) ([]*backend.Meta, error) {
	l, err := r.inner.List(ctx, kind)
	if err != nil {
		return nil, err
	}
	out := make([]*backend.Meta, len(l))
	for i, m := range l {
		out[i] = r.out(m)
	}
	return out, nil
}

func (r *rbdPool) Delete(ctx context.Context, kind backend.Kind, id string, shred backend.BuildFunc) error {
	inner, ok := r.in(id)
	if !ok {
		return nil
	}
	return r.inner.Delete(ctx, kind, inner, shred)
}

func (r *rbdPool) Resize(ctx context.Context, id string, imageSize, size int64) (*backend.Meta, error) {
	inner, ok := r.in(id)
	if !ok {
		return nil, r.notHere(backend.KindVolume, id)
	}
	m, err := r.inner.Resize(ctx, inner, imageSize, size)
	return r.out(m), err
}

func (r *rbdPool) OpenImage(ctx context.Context, kind backend.Kind, id string) (backend.Image, error) {
	inner, ok := r.in(id)
	if !ok {
		return nil, r.notHere(kind, id)
	}
	return r.inner.OpenImage(ctx, kind, inner)
}

func (r *rbdPool) OpenImageForUpdate(ctx context.Context, kind backend.Kind, id string) (backend.Image, error) {
	inner, ok := r.in(id)
	if !ok {
		return nil, r.notHere(kind, id)
	}
	return r.inner.OpenImageForUpdate(ctx, kind, inner)
}

func (r *rbdPool) ImagePath(volumeID string) (string, error) {
	inner, ok := r.in(volumeID)
	if !ok {
		return "", r.notHere(backend.KindVolume, volumeID)
	}
	return r.inner.ImagePath(inner)
}

func (r *rbdPool) Capacity(ctx context.Context) (int64, error) { return r.inner.Capacity(ctx) }

func (r *rbdPool) CheckWritable(ctx context.Context) error { return r.inner.CheckWritable(ctx) }
