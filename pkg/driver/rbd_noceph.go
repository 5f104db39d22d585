//go:build !ceph

package driver

import (
	"github.com/csi-encdisk/csi-encdisk/pkg/backend"
)

// cephSupported: this build has the Ceph RBD backend (-tags ceph,pacific).
const cephSupported = false

func newRBDPool(string) (backend.Pool, error) { return nil, errNoCephBuild }
