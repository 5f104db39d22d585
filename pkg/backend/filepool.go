package backend

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-encdisk/csi-encdisk/pkg/imagelock"
	"k8s.io/klog/v2"
)

// Layout of a FilePool under its root:
//
//	volumes/<id>/image, volumes/<id>/meta.json
//	snapshots/<id>/image, snapshots/<id>/meta.json
//	tmp/<id>.<random>/...   objects being built or removed
//
// An object is built completely in tmp and renamed into place last, so List
// never sees a half-made one; removal renames it back into tmp first.
// ImageFileName is the name of the image file inside an object's directory
// of the file pool (DATA_DIR/pool/{volumes,snapshots}/ID/).
const ImageFileName = "image"

const (
	imageFile = ImageFileName
	metaFile  = "meta.json"
	lockFile  = ".lock"
	tmpDir    = "tmp"
)

// Fault points passed to Options.Fault, in the order Create reaches them.
const (
	FaultCreateCopied       = "create:copied"
	FaultCreateBuilt        = "create:built"
	FaultCreateBeforeRename = "create:before-rename"
	FaultDeleteShredded     = "delete:shredded"
)

// Options tune a FilePool.
type Options struct {
	// Fault, when set, is called at the named points of Create and Delete;
	// tests use it to kill the process mid-way.
	Fault func(point string)
}

// FilePool is a Pool of image files under one directory.
type FilePool struct {
	root  string
	opts  Options
	mu    sync.Mutex
	names map[string]chan struct{}
}

var _ Pool = (*FilePool)(nil)

// NewFilePool opens (creating if needed) the pool under root and removes the
// leftovers of builds and removals that a dead process did not finish.
func NewFilePool(root string, opts Options) (*FilePool, error) {
	for _, d := range []string{kindDir(KindVolume), kindDir(KindSnapshot), tmpDir} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o700); err != nil {
			return nil, fmt.Errorf("backend: create pool directory: %w", err)
		}
	}
	p := &FilePool{root: root, opts: opts, names: map[string]chan struct{}{}}
	if err := p.cleanTmp(); err != nil {
		return nil, err
	}
	return p, nil
}

// Root is the pool's directory.
func (p *FilePool) Root() string { return p.root }

func kindDir(k Kind) string {
	if k == KindSnapshot {
		return "snapshots"
	}
	return "volumes"
}

func (p *FilePool) objDir(kind Kind, id string) string {
	return filepath.Join(p.root, kindDir(kind), id)
}

func (p *FilePool) fault(point string) {
	if p.opts.Fault != nil {
		p.opts.Fault(point)
	}
}

// cleanTmp removes entries of tmp whose owner is gone: each entry holds a
// lock file that its builder keeps flock'ed, so a lock that can be taken
// means a dead builder. Entries without a lock file yet are left alone for
// a minute (their builder may be between mkdir and flock).
func (p *FilePool) cleanTmp() error {
	dir := filepath.Join(p.root, tmpDir)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("backend: read %s: %w", dir, err)
	}
	for _, e := range entries {
		path := filepath.Join(dir, e.Name())
		lf, err := os.Open(filepath.Join(path, lockFile))
		if err != nil {
			info, serr := os.Lstat(path)
			if serr == nil && time.Since(info.ModTime()) < time.Minute && e.IsDir() {
				continue
			}
		} else {
			err = unix.Flock(int(lf.Fd()), unix.LOCK_EX|unix.LOCK_NB)
			lf.Close()
			if err != nil {
				continue // a live process owns it
			}
		}
		if err := os.RemoveAll(path); err != nil {
			return fmt.Errorf("backend: remove leftover %s: %w", path, err)
		}
		klog.InfoS("Removed leftover of an unfinished pool operation", "path", path)
	}
	return nil
}

// ID implements Pool.
func (p *FilePool) ID(kind Kind, name string) string { return ObjectID(kind, name) }

// Lock implements Pool.
func (p *FilePool) Lock(ctx context.Context, kind Kind, name string) (func(), error) {
	key := string(kind) + "/" + name
	for {
		p.mu.Lock()
		ch, held := p.names[key]
		if !held {
			ch = make(chan struct{})
			p.names[key] = ch
			p.mu.Unlock()
			return func() {
				p.mu.Lock()
				delete(p.names, key)
				p.mu.Unlock()
				close(ch)
			}, nil
		}
		p.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, fmt.Errorf("backend: wait for %s %q: %w", kind, name, ctx.Err())
		}
	}
}

// tmpEntry is a directory in tmp owned by this process through its lock.
type tmpEntry struct {
	path string
	lock *os.File
}

func (p *FilePool) newTmp(id, what string) (*tmpEntry, error) {
	var rnd [6]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return nil, fmt.Errorf("backend: random name: %w", err)
	}
	path := filepath.Join(p.root, tmpDir, id+"."+what+"."+hex.EncodeToString(rnd[:]))
	if err := os.Mkdir(path, 0o700); err != nil {
		return nil, fmt.Errorf("backend: %w", err)
	}
	lf, err := os.OpenFile(filepath.Join(path, lockFile), os.O_CREATE|os.O_RDWR, 0o600)
	if err == nil {
		err = unix.Flock(int(lf.Fd()), unix.LOCK_EX)
	}
	if err != nil {
		if lf != nil {
			lf.Close()
		}
		os.RemoveAll(path)
		return nil, fmt.Errorf("backend: lock %s: %w", path, err)
	}
	return &tmpEntry{path: path, lock: lf}, nil
}

// release removes the entry (if still in tmp) and drops its lock.
func (t *tmpEntry) release() {
	os.RemoveAll(t.path)
	t.lock.Close()
}

// Create implements Pool.
func (p *FilePool) Create(ctx context.Context, req CreateRequest) (*Meta, error) {
	meta := req.Meta
	if meta.Kind != KindVolume && meta.Kind != KindSnapshot {
		return nil, fmt.Errorf("backend: unknown kind %q", meta.Kind)
	}
	meta.ID = ObjectID(meta.Kind, meta.Name)
	final := p.objDir(meta.Kind, meta.ID)
	if old, err := p.Get(ctx, meta.Kind, meta.ID); err == nil {
		return old, fmt.Errorf("%w: %s %s", ErrExists, meta.Kind, meta.ID)
	} else if !errors.Is(err, ErrNotFound) {
		return nil, err
	}
	tmp, err := p.newTmp(meta.ID, "create")
	if err != nil {
		return nil, err
	}
	defer tmp.release()

	img, err := os.OpenFile(filepath.Join(tmp.path, imageFile), os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("backend: create image: %w", err)
	}
	defer img.Close()
	if req.Source != nil {
		src, err := p.openFile(req.Source.Kind, req.Source.ID, os.O_RDONLY)
		if err != nil {
			return nil, err
		}
		reflinked, err := CopyImage(ctx, img, src)
		src.Close()
		if err != nil {
			return nil, fmt.Errorf("backend: copy %s %s: %w", req.Source.Kind, req.Source.ID, err)
		}
		klog.FromContext(ctx).V(4).Info("Copied image", "source", req.Source.ID, "target", meta.ID, "reflink", reflinked)
		p.fault(FaultCreateCopied)
	}
	st, err := img.Stat()
	if err != nil {
		return nil, fmt.Errorf("backend: %w", err)
	}
	if req.ImageSize > st.Size() {
		if err := img.Truncate(req.ImageSize); err != nil {
			return nil, fmt.Errorf("backend: size image to %d bytes: %w", req.ImageSize, err)
		}
	}
	if req.Build != nil {
		if err := req.Build(ctx, FileImage{img}); err != nil {
			return nil, err
		}
	}
	if st, err = img.Stat(); err != nil {
		return nil, fmt.Errorf("backend: %w", err)
	}
	meta.ImageSize = st.Size()
	if err := img.Sync(); err != nil {
		return nil, fmt.Errorf("backend: sync image: %w", err)
	}
	p.fault(FaultCreateBuilt)
	meta.CreatedAt = time.Now().UTC().Truncate(time.Microsecond)
	if err := writeMeta(tmp.path, &meta); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("backend: create %s: %w", meta.ID, err)
	}
	p.fault(FaultCreateBeforeRename)
	if err := os.Rename(tmp.path, final); err != nil {
		return nil, fmt.Errorf("backend: move %s into place: %w", meta.ID, err)
	}
	if err := syncDir(filepath.Dir(final)); err != nil {
		return nil, err
	}
	return &meta, nil
}

// writeMeta stores m as dir/meta.json atomically: temp file, fsync, rename,
// directory fsync.
func writeMeta(dir string, m *Meta) error {
	data, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return fmt.Errorf("backend: encode metadata: %w", err)
	}
	tmp := filepath.Join(dir, metaFile+".tmp")
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("backend: write metadata: %w", err)
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, filepath.Join(dir, metaFile))
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("backend: write metadata: %w", err)
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("backend: sync directory: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("backend: sync directory %s: %w", dir, err)
	}
	return nil
}

// Get implements Pool.
func (p *FilePool) Get(_ context.Context, kind Kind, id string) (*Meta, error) {
	if err := checkID(kind, id); err != nil {
		return nil, err
	}
	data, err := os.ReadFile(filepath.Join(p.objDir(kind, id), metaFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s %s", ErrNotFound, kind, id)
	}
	if err != nil {
		return nil, fmt.Errorf("backend: read metadata of %s: %w", id, err)
	}
	var m Meta
	if err := json.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("%w: %s %s: %s: %v", ErrCorrupt, kind, id, metaFile, err)
	}
	if err := m.check(kind, id); err != nil {
		return nil, fmt.Errorf("%w: %s %s: %s: %v", ErrCorrupt, kind, id, metaFile, err)
	}
	return &m, nil
}

// List implements Pool.
func (p *FilePool) List(ctx context.Context, kind Kind) ([]*Meta, error) {
	entries, err := os.ReadDir(filepath.Join(p.root, kindDir(kind)))
	if err != nil {
		return nil, fmt.Errorf("backend: list %ss: %w", kind, err)
	}
	var out []*Meta
	for _, e := range entries {
		if !ValidID(kind, e.Name()) {
			continue
		}
		m, err := p.Get(ctx, kind, e.Name())
		if errors.Is(err, ErrNotFound) {
			continue // removed meanwhile
		}
		if err != nil {
			// One unreadable object must not hide the others: it is left
			// out (and stays readable to Delete), with the reason logged.
			klog.FromContext(ctx).Error(err, "Skipping an unreadable object of the pool", "kind", kind, "id", e.Name())
			continue
		}
		out = append(out, m)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

// Delete implements Pool. The shred hook runs in place first (a crash after
// it leaves an object that a retried Delete shreds again and removes).
func (p *FilePool) Delete(ctx context.Context, kind Kind, id string, shred BuildFunc) error {
	if !ValidID(kind, id) {
		return nil
	}
	dir := p.objDir(kind, id)
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	// The image's writer lock (pkg/imagelock) is taken, not just tested,
	// and held until the object is gone: no engine or node can start
	// serving it in between, and one that serves it now makes this fail.
	f, err := os.OpenFile(filepath.Join(dir, imageFile), os.O_RDWR, 0)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return fmt.Errorf("backend: open %s: %w", id, err)
	default:
		defer f.Close()
		if err := imagelock.Lock(f, imagelock.Write, ""); err != nil {
			return fmt.Errorf("backend: %s %s: %w", kind, id, err)
		}
		if shred != nil {
			if err := shred(ctx, FileImage{f}); err != nil {
				return err
			}
		}
	}
	p.fault(FaultDeleteShredded)
	tmp, err := p.newTmp(id, "delete")
	if err != nil {
		return err
	}
	defer tmp.release()
	gone := filepath.Join(tmp.path, "object")
	if err := os.Rename(dir, gone); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("backend: remove %s: %w", id, err)
	}
	if err := syncDir(filepath.Dir(dir)); err != nil {
		return err
	}
	if err := os.RemoveAll(gone); err != nil {
		return fmt.Errorf("backend: remove %s: %w", id, err)
	}
	return nil
}

// Resize implements Pool.
func (p *FilePool) Resize(ctx context.Context, id string, imageSize, size int64) (*Meta, error) {
	m, err := p.Get(ctx, KindVolume, id)
	if err != nil {
		return nil, err
	}
	dir := p.objDir(KindVolume, id)
	f, err := os.OpenFile(filepath.Join(dir, imageFile), os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("backend: open %s: %w", id, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("backend: %w", err)
	}
	if imageSize > st.Size() {
		if err := f.Truncate(imageSize); err != nil {
			return nil, fmt.Errorf("backend: grow %s to %d bytes: %w", id, imageSize, err)
		}
		if err := f.Sync(); err != nil {
			return nil, fmt.Errorf("backend: sync %s: %w", id, err)
		}
		m.ImageSize = imageSize
	}
	if size > m.Size {
		m.Size = size
	}
	if err := writeMeta(dir, m); err != nil {
		return nil, err
	}
	return m, nil
}

// OpenImage implements Pool.
func (p *FilePool) OpenImage(_ context.Context, kind Kind, id string) (Image, error) {
	f, err := p.openFile(kind, id, os.O_RDONLY)
	if err != nil {
		return nil, err
	}
	return FileImage{f}, nil
}

// OpenImageForUpdate implements Pool.
func (p *FilePool) OpenImageForUpdate(_ context.Context, kind Kind, id string) (Image, error) {
	f, err := p.openFile(kind, id, os.O_RDWR)
	if err != nil {
		return nil, err
	}
	return FileImage{f}, nil
}

func (p *FilePool) openFile(kind Kind, id string, flag int) (*os.File, error) {
	if err := checkID(kind, id); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(p.objDir(kind, id), imageFile), flag, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s %s", ErrNotFound, kind, id)
	}
	if err != nil {
		return nil, fmt.Errorf("backend: open %s: %w", id, err)
	}
	return f, nil
}

// ImagePath implements Pool. The volume must exist.
func (p *FilePool) ImagePath(volumeID string) (string, error) {
	if err := checkID(KindVolume, volumeID); err != nil {
		return "", err
	}
	path := filepath.Join(p.objDir(KindVolume, volumeID), imageFile)
	if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("%w: volume %s", ErrNotFound, volumeID)
	} else if err != nil {
		return "", fmt.Errorf("backend: %w", err)
	}
	return path, nil
}

// Capacity implements Pool: the bytes available to unprivileged writers of
// the pool's filesystem.
func (p *FilePool) Capacity(_ context.Context) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(p.root, &st); err != nil {
		return 0, fmt.Errorf("backend: statfs %s: %w", p.root, err)
	}
	return int64(st.Bavail) * st.Bsize, nil
}

// CheckWritable implements Pool: it writes, syncs and removes a small file.
func (p *FilePool) CheckWritable(_ context.Context) error {
	f, err := os.CreateTemp(filepath.Join(p.root, tmpDir), "probe-*")
	if err != nil {
		return fmt.Errorf("backend: pool %s is not writable: %w", p.root, err)
	}
	name := f.Name()
	defer os.Remove(name)
	_, err = f.Write([]byte("probe"))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("backend: pool %s is not writable: %w", p.root, err)
	}
	return nil
}
