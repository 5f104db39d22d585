//go:build ceph

package driver

import (
	"github.com/csi-encdisk/csi-encdisk/pkg/backend"
	"github.com/csi-encdisk/csi-encdisk/pkg/rbd"
)

// cephSupported: this build has the Ceph RBD backend (-tags ceph,pacific).
const cephSupported = true

func newRBDPool(name string) (backend.Pool, error) { return rbd.NewPool(name) }
