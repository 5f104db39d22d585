//go:build ceph

package blockdev

import (
	"context"
	"errors"

	"github.com/csi-encdisk/csi-encdisk/pkg/backend"
	"github.com/csi-encdisk/csi-encdisk/pkg/rbd"
)

// rbdImage is an RBD image served through librbd (rbd_cache off: a write is
// acknowledged once RADOS has it, as O_DIRECT promises). librbd serves
// concurrent synchronous calls on one handle, so the FUSE server's parallel
// requests are the I/O in flight. It keeps the credentials it was opened
// with (librados holds the key anyway) for a supervisor that adopts the
// engine and must be able to start its replacement (control op
// "credentials"); Close wipes them.
type rbdImage struct {
	*rbd.Image
	creds *rbd.Credentials
}

// DirectIO: no cache of this node holds the data (rbd_cache is off).
func (rbdImage) DirectIO() bool { return true }

// RecordedEncrypted reads the volume record the controller keeps on the
// image (its csi-encdisk.meta key): the engine serves the volume only in
// the mode it was made with.
func (i rbdImage) RecordedEncrypted() (encrypted, recorded bool, err error) {
	m, err := i.Meta()
	if errors.Is(err, backend.ErrNotFound) {
		return false, false, nil
	}
	if err != nil {
		return false, false, err
	}
	return m.Encrypted, true, nil
}

// Credentials are the credentials the image was opened with.
func (i rbdImage) Credentials() *rbd.Credentials { return i.creds }

// Close closes the image and wipes the credentials.
func (i rbdImage) Close() error {
	defer i.creds.Wipe()
	return i.Image.Close()
}

func openRBDImage(ctx context.Context, ref rbd.Ref) (imageIO, error) {
	c, err := rbd.ReadCredentials()
	if err != nil {
		return nil, err
	}
	img, err := rbd.OpenEngineImage(ctx, ref, c)
	if err != nil {
		c.Wipe()
		return nil, err
	}
	return rbdImage{Image: img, creds: c}, nil
}

// RBDSupported reports whether this build serves RBD images.
const RBDSupported = true
