package driver

import (
	"context"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/csi-encdisk/csi-encdisk/pkg/backend"
)

// TestCapacityRanges: sizes that overflow or that no image can have are
// OutOfRange naming the field and the maximum, in CreateVolume and
// ControllerExpandVolume, for both kinds of volume; nothing is left behind.
func TestCapacityRanges(t *testing.T) {
	ctx := context.Background()
	e := newCtlEnv(t, "r1")
	maxStr := "1152921504590069760" // (2^60 - 16 MiB header), the encrypted maximum
	for _, enc := range []string{"true", "false"} {
		params := map[string]string{"encrypted": enc}
		for _, tc := range []struct {
			name     string
			req, lim int64
			want     []string
		}{
			{"max", math.MaxInt64, 0, []string{"required_bytes", "maximum"}},
			{"max-1", math.MaxInt64 - 1, 0, []string{"required_bytes", "maximum"}},
			{"2^62", 1 << 62, 0, []string{"required_bytes", "maximum"}},
			{"2^63-4096", math.MaxInt64 - 4095, math.MaxInt64, []string{"required_bytes", "maximum"}},
			{"limit below required", 2 << 20, 1 << 20, []string{"limit_bytes"}},
			{"limit below sector rounding", 1, 100, []string{"limit_bytes"}},
		} {
			_, err := e.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{
				Name: "v-" + enc + "-" + tc.name, VolumeCapabilities: ctlMountCap, Parameters: params,
				CapacityRange: &csi.CapacityRange{RequiredBytes: tc.req, LimitBytes: tc.lim},
			})
			wantStatus(t, "CreateVolume encrypted="+enc+" "+tc.name, err, codes.OutOfRange, tc.want...)
		}
		_, err := e.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{
			Name: "v-" + enc + "-msg", VolumeCapabilities: ctlMountCap, Parameters: params,
			CapacityRange: &csi.CapacityRange{RequiredBytes: math.MaxInt64},
		})
		if enc == "true" {
			wantStatus(t, "maximum named", err, codes.OutOfRange, maxStr)
		}
		// A huge limit alone is only a bound: the default size is used.
		v, err := e.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{
			Name: "v-" + enc + "-biglimit", VolumeCapabilities: ctlMountCap, Parameters: params,
			CapacityRange: &csi.CapacityRange{LimitBytes: math.MaxInt64},
		})
		if err != nil || v.GetVolume().GetCapacityBytes() != defaultVolumeSize {
			t.Fatalf("huge limit only: %v, %v", v, err)
		}
		vol := e.mustCreate("v-"+enc, 8<<20, params, nil)
		for _, size := range []int64{math.MaxInt64, math.MaxInt64 - 511, 1 << 62, 1 << 61} {
			_, err := e.ctl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{
				VolumeId: vol.VolumeId, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
			})
			wantStatus(t, "expand", err, codes.OutOfRange, "required_bytes", "maximum")
		}
		m, err := e.pool.Get(ctx, backend.KindVolume, vol.VolumeId)
		if err != nil || m.Size != 8<<20 {
			t.Fatalf("volume changed by refused expansions: %+v, %v", m, err)
		}
		// Restores from a snapshot are checked against the source's header.
		snap := e.snapshot("s-"+enc, vol.VolumeId)
		_, err = e.create("r-"+enc, math.MaxInt64, nil, snapSource(snap.SnapshotId))
		wantStatus(t, "restore", err, codes.OutOfRange, "required_bytes", "maximum")
	}
	// Below the driver's maximum, the pool's filesystem may still refuse
	// the file (ext4: 16 TiB): that is OutOfRange too, never Internal.
	if _, err := e.create("huge", 1<<59, map[string]string{"encrypted": "false"}, nil); err != nil {
		wantStatus(t, "2^59 bytes", err, codes.OutOfRange)
		t.Logf("2^59 bytes: %v", err)
	} else {
		e.ctl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: backend.ObjectID(backend.KindVolume, "huge")})
	}
	tmp, _ := os.ReadDir(filepath.Join(e.pool.Root(), "tmp"))
	list, _ := e.pool.List(ctx, backend.KindVolume)
	if len(tmp) != 0 || len(list) != 4 {
		t.Fatalf("left behind: %d tmp entries, %d volumes (want 4)", len(tmp), len(list))
	}
}

// TestMinimumFilesystemSize: a new empty volume too small for its
// filesystem (1000 bytes of ext4, 100 MiB of xfs) is OutOfRange at
// CreateVolume, naming the minimum, and nothing is created; block volumes
// and volumes big enough are made.
func TestMinimumFilesystemSize(t *testing.T) {
	ctx := context.Background()
	e := newCtlEnv(t, "r1")
	mount := func(fs string) []*csi.VolumeCapability {
		return []*csi.VolumeCapability{{
			AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fs}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
		}}
	}
	block := []*csi.VolumeCapability{{
		AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}}
	for _, enc := range []string{"true", "false"} {
		for _, tc := range []struct {
			name   string
			caps   []*csi.VolumeCapability
			params map[string]string
			size   int64
			ok     bool
		}{
			{"ext4-1000", mount("ext4"), nil, 1000, false},
			{"default-fs-1000", mount(""), nil, 1000, false},
			{"xfs-100M", mount("xfs"), nil, 100 << 20, false},
			{"class-xfs-100M", mount(""), map[string]string{"csi.storage.k8s.io/fstype": "xfs"}, 100 << 20, false},
			{"ext4-1M", mount("ext4"), nil, 1 << 20, true},
			{"block-4096", block, nil, 4096, true},
		} {
			params := map[string]string{"encrypted": enc}
			for k, v := range tc.params {
				params[k] = v
			}
			name := "min-" + enc + "-" + tc.name
			_, err := e.ctl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, VolumeCapabilities: tc.caps, Parameters: params,
				CapacityRange: &csi.CapacityRange{RequiredBytes: tc.size}})
			if tc.ok {
				if err != nil {
					t.Errorf("%s: %v", name, err)
				}
				continue
			}
			wantStatus(t, name, err, codes.OutOfRange, "too small", "needs at least")
			if _, err := e.pool.Get(ctx, backend.KindVolume, e.pool.ID(backend.KindVolume, name)); err == nil {
				t.Errorf("%s: a refused volume exists", name)
			}
		}
	}
}
