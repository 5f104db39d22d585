// Package backend stores the images of volumes and snapshots. Pool is the
// interface the CSI controller and node use; FilePool keeps one image file per
// object under a data directory. Other stores (LVM, a cloud disk API, Ceph
// RBD) can implement Pool without touching the CSI code.
package backend

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/csi-encdisk/csi-encdisk/pkg/imagelock"
)

// Kind says whether an object is a volume or a snapshot.
type Kind string

// The two kinds of objects in a pool.
const (
	KindVolume   Kind = "volume"
	KindSnapshot Kind = "snapshot"
)

// ErrNotFound is returned (wrapped) for an object that does not exist.
var ErrNotFound = errors.New("backend: not found")

// ErrExists is returned (wrapped) when Create finds the object already there;
// the existing object's metadata is returned alongside.
var ErrExists = errors.New("backend: already exists")

// ErrCorrupt is returned (wrapped) for an object whose metadata cannot be
// read or makes no sense: that one object is unusable (List skips it and
// logs why), never the whole pool.
var ErrCorrupt = errors.New("backend: damaged metadata")

// ErrInUse is returned (wrapped) by Delete while an engine or a node serves
// the image (it holds the image's writer lock, pkg/imagelock).
var ErrInUse = imagelock.ErrInUse

// MaxImageSize is the largest image (header included) a pool accepts: 1 EiB.
const MaxImageSize int64 = 1 << 60

// Meta is the metadata of one volume or snapshot. It holds no secret.
type Meta struct {
	ID   string `json:"id"`
	Name string `json:"name"`
	Kind Kind   `json:"kind"`
	// Size is the usable capacity in bytes (the data segment of an
	// encrypted image, the whole image of a plain one).
	Size int64 `json:"size"`
	// ImageSize is the size of the image file (header included).
	ImageSize int64 `json:"imageSize"`
	// SourceVolumeID is the volume a snapshot was taken of, or the volume a
	// clone was made from.
	SourceVolumeID string `json:"sourceVolumeID,omitempty"`
	// SourceSnapshotID is the snapshot a volume was restored from.
	SourceSnapshotID string `json:"sourceSnapshotID,omitempty"`
	Encrypted        bool   `json:"encrypted"`
	KMSID            string `json:"kmsID,omitempty"`
	SectorSize       int    `json:"sectorSize"`
	AllowDiscards    bool   `json:"allowDiscards"`
	Region           string `json:"region,omitempty"`
	// Parameters are the parameters the object was created with, kept so that
	// a repeated CreateVolume can be compared with the first.
	Parameters map[string]string `json:"parameters,omitempty"`
	CreatedAt  time.Time         `json:"createdAt"`
}

// check reports what makes m impossible as the metadata of object id of
// kind, or nil.
func (m *Meta) check(kind Kind, id string) error {
	switch {
	case m.ID != id:
		return fmt.Errorf("it names object %q", m.ID)
	case m.Kind != kind:
		return fmt.Errorf("it names kind %q", m.Kind)
	case m.Name == "":
		return errors.New("it has no name")
	case m.Size < 0 || m.Size > MaxImageSize:
		return fmt.Errorf("size %d is outside 0 to %d", m.Size, MaxImageSize)
	case m.ImageSize < m.Size || m.ImageSize > MaxImageSize:
		return fmt.Errorf("image size %d is outside %d (size) to %d", m.ImageSize, m.Size, MaxImageSize)
	case m.SectorSize != 0 && m.SectorSize != 512 && m.SectorSize != 4096:
		return fmt.Errorf("sector size %d is not 512 or 4096", m.SectorSize)
	}
	return nil
}

// BuildFunc fills a new image before it becomes visible, for example by
// writing a LUKS2 header. The image is open read-write.
type BuildFunc func(ctx context.Context, img Image) error

// CreateRequest describes a new object.
type CreateRequest struct {
	// Meta is stored as given, except ID and CreatedAt, which Create sets.
	Meta Meta
	// Source, when set, is the object whose image is copied first (reflink
	// when the filesystem can, otherwise a sparse copy).
	Source *Meta
	// ImageSize is the size the image is grown to (sparse) after the copy;
	// it never shrinks a copied image.
	ImageSize int64
	// Build, when set, runs on the image after the copy and the sizing.
	Build BuildFunc
}

// Pool stores volume and snapshot images with their metadata.
type Pool interface {
	// ID is the object ID that Create gives the object of this kind and name.
	ID(kind Kind, name string) string
	// Lock serialises work on one object name (same-name calls wait for each
	// other, different names run in parallel). Call the returned func to
	// release it.
	Lock(ctx context.Context, kind Kind, name string) (func(), error)
	// Create builds a new object; it becomes visible only when complete. If
	// one with the same ID exists, Create returns its metadata and ErrExists.
	Create(ctx context.Context, req CreateRequest) (*Meta, error)
	// Get returns an object's metadata, or ErrNotFound.
	Get(ctx context.Context, kind Kind, id string) (*Meta, error)
	// List returns all objects of a kind, sorted by ID.
	List(ctx context.Context, kind Kind) ([]*Meta, error)
	// Delete runs shred on the image (if set), then removes the object.
	// A missing object is not an error; an image in use (its writer lock
	// held) is ErrInUse and nothing changes.
	Delete(ctx context.Context, kind Kind, id string, shred BuildFunc) error
	// Resize grows a volume's image to imageSize bytes and records size as
	// its usable capacity.
	Resize(ctx context.Context, id string, imageSize, size int64) (*Meta, error)
	// OpenImage opens an object's image read-only.
	OpenImage(ctx context.Context, kind Kind, id string) (Image, error)
	// OpenImageForUpdate opens an object's image read-write, for header
	// updates only (a re-wrapped KMS token); never for data.
	OpenImageForUpdate(ctx context.Context, kind Kind, id string) (Image, error)
	// ImagePath is where the node finds a volume's image.
	ImagePath(volumeID string) (string, error)
	// Capacity is the number of bytes free for new images.
	Capacity(ctx context.Context) (int64, error)
	// CheckWritable reports whether the pool can store new objects.
	CheckWritable(ctx context.Context) error
}

// idPrefix is the ID prefix of each kind.
func idPrefix(k Kind) string {
	if k == KindSnapshot {
		return "snap-"
	}
	return "vol-"
}

// ObjectID derives an object's ID from its name, so that a retried create
// (after a crash too) finds the same object: a prefix for the kind and 128
// bits of SHA-256 of the name.
func ObjectID(kind Kind, name string) string {
	sum := sha256.Sum256([]byte(name))
	return idPrefix(kind) + hex.EncodeToString(sum[:16])
}

// ValidID reports whether id is a well-formed ID of kind; it keeps IDs from
// naming paths outside the pool.
func ValidID(kind Kind, id string) bool {
	rest, ok := strings.CutPrefix(id, idPrefix(kind))
	if !ok || len(rest) != 32 {
		return false
	}
	_, err := hex.DecodeString(rest)
	return err == nil && strings.ToLower(rest) == rest
}

func checkID(kind Kind, id string) error {
	if !ValidID(kind, id) {
		return fmt.Errorf("%w: %q is not a %s ID of this pool", ErrNotFound, id, kind)
	}
	return nil
}
