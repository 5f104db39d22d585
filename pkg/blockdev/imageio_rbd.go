//go:build ceph

package blockdev

import (
	"context"

	"github.com/csi-encdisk/csi-encdisk/pkg/rbd"
)

// rbdImage is an RBD image served through librbd (rbd_cache off: a write is
// acknowledged once RADOS has it, as O_DIRECT promises). librbd serves
// concurrent synchronous calls on one handle, so the FUSE server's parallel
// requests are the I/O in flight.
type rbdImage struct{ *rbd.Image }

// DirectIO: no cache of this node holds the data (rbd_cache is off).
func (rbdImage) DirectIO() bool { return true }

func openRBDImage(ctx context.Context, ref rbd.Ref) (imageIO, error) {
	c, err := rbd.ReadCredentials()
	if err != nil {
		return nil, err
	}
	defer c.Wipe()
	img, err := rbd.OpenEngineImage(ctx, ref, c)
	if err != nil {
		return nil, err
	}
	return rbdImage{img}, nil
}

// RBDSupported reports whether this build serves RBD images.
const RBDSupported = true
