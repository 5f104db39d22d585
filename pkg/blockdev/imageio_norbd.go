//go:build !ceph

package blockdev

import (
	"context"
	"fmt"

	"github.com/csi-encdisk/csi-encdisk/pkg/rbd"
)

func openRBDImage(_ context.Context, ref rbd.Ref) (imageIO, error) {
	return nil, fmt.Errorf("engine: image %s is in Ceph RBD, and this build has no RBD support (build with -tags ceph,pacific)", ref)
}

// RBDSupported reports whether this build serves RBD images.
const RBDSupported = false
