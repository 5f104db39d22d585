// Package csiclient drives a CSI endpoint the way Kubernetes does (the
// provisioner and snapshotter on the controller side, kubelet on the node
// side). The demo, the benchmarks and the end-to-end tests all use it, so
// that the driver is called one way everywhere.
package csiclient

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// RegionKey is the topology segment the driver reports its region under.
const RegionKey = "topology.encdisk.csi.io/region"

// Client is a connection to one CSI endpoint with its three services.
type Client struct {
	Conn       *grpc.ClientConn
	Identity   csi.IdentityClient
	Controller csi.ControllerClient
	Node       csi.NodeClient
}

// Dial connects to the CSI endpoint at the unix socket path (no I/O yet).
func Dial(socket string) (*Client, error) {
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("csi client for %s: %w", socket, err)
	}
	return &Client{
		Conn:       conn,
		Identity:   csi.NewIdentityClient(conn),
		Controller: csi.NewControllerClient(conn),
		Node:       csi.NewNodeClient(conn),
	}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.Conn.Close() }

// WaitReady calls Probe until the driver answers ready (or, with
// acceptNotReady, answers at all), or ctx ends.
func (c *Client) WaitReady(ctx context.Context, acceptNotReady bool) error {
	for {
		pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		resp, err := c.Identity.Probe(pctx, &csi.ProbeRequest{})
		cancel()
		if err == nil && (resp.GetReady() == nil || resp.GetReady().GetValue() || acceptNotReady) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("driver not ready: %w (last Probe: %v)", ctx.Err(), err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Block is the access of Capability for a raw block volume.
const Block = "block"

// Capability is SINGLE_NODE_WRITER with raw block access (access Block) or
// a filesystem of type access ("" lets the driver choose).
func Capability(access string) *csi.VolumeCapability {
	c := &csi.VolumeCapability{AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}
	if access == Block {
		c.AccessType = &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}
	} else {
		c.AccessType = &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: access}}
	}
	return c
}

// SnapshotSource and VolumeSource name what a new volume is made from.
func SnapshotSource(id string) *csi.VolumeContentSource {
	return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: id}}}
}

// VolumeSource names a volume to clone.
func VolumeSource(id string) *csi.VolumeContentSource {
	return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}}
}

// VolumeRequest is what CreateVolume asks for.
type VolumeRequest struct {
	Name       string
	Size       int64
	Access     string // Block or a filesystem type
	Parameters map[string]string
	Source     *csi.VolumeContentSource // nil for an empty volume
	Region     string                   // preferred topology; "" for none
}

// CreateVolume creates a volume as the provisioner would.
func (c *Client) CreateVolume(ctx context.Context, r VolumeRequest) (*csi.Volume, error) {
	req := &csi.CreateVolumeRequest{
		Name:                r.Name,
		CapacityRange:       &csi.CapacityRange{RequiredBytes: r.Size},
		VolumeCapabilities:  []*csi.VolumeCapability{Capability(r.Access)},
		Parameters:          r.Parameters,
		VolumeContentSource: r.Source,
	}
	if r.Region != "" {
		req.AccessibilityRequirements = &csi.TopologyRequirement{
			Preferred: []*csi.Topology{{Segments: map[string]string{RegionKey: r.Region}}},
		}
	}
	resp, err := c.Controller.CreateVolume(ctx, req)
	if err != nil {
		return nil, fmt.Errorf("CreateVolume %s: %w", r.Name, err)
	}
	return resp.GetVolume(), nil
}

// Publication is a volume as kubelet uses it on a node: staged at one path
// and published at another. Staged and Published say how far it got, so
// that Unpublish and Unstage undo exactly that.
type Publication struct {
	Volume      *csi.Volume
	Capability  *csi.VolumeCapability
	StagingPath string
	TargetPath  string
	Staged      bool
	Published   bool
}

// NewPublication places a volume under dir: staging at dir/staging/label,
// target at dir/pods/label/target (the parents are made; the target itself
// is left to the driver, as kubelet leaves it).
func NewPublication(v *csi.Volume, access, dir, label string) (*Publication, error) {
	p := &Publication{
		Volume:      v,
		Capability:  Capability(access),
		StagingPath: filepath.Join(dir, "staging", label),
		TargetPath:  filepath.Join(dir, "pods", label, "target"),
	}
	if err := os.MkdirAll(p.StagingPath, 0o750); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(p.TargetPath), 0o750); err != nil {
		return nil, err
	}
	return p, nil
}

// ID is the volume's ID.
func (p *Publication) ID() string { return p.Volume.GetVolumeId() }

// Stage calls NodeStageVolume. A failed stage still counts as staged: it
// may have left pieces, and unstage is idempotent.
func (c *Client) Stage(ctx context.Context, p *Publication) error {
	p.Staged = true
	_, err := c.Node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{
		VolumeId:          p.ID(),
		StagingTargetPath: p.StagingPath,
		VolumeCapability:  p.Capability,
		VolumeContext:     p.Volume.GetVolumeContext(),
	})
	if err != nil {
		return fmt.Errorf("NodeStageVolume %s: %w", p.ID(), err)
	}
	return nil
}

// Publish calls NodePublishVolume.
func (c *Client) Publish(ctx context.Context, p *Publication, readOnly bool) error {
	p.Published = true
	_, err := c.Node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{
		VolumeId:          p.ID(),
		StagingTargetPath: p.StagingPath,
		TargetPath:        p.TargetPath,
		VolumeCapability:  p.Capability,
		VolumeContext:     p.Volume.GetVolumeContext(),
		Readonly:          readOnly,
	})
	if err != nil {
		return fmt.Errorf("NodePublishVolume %s: %w", p.ID(), err)
	}
	return nil
}

// StagePublish stages and publishes (read-write).
func (c *Client) StagePublish(ctx context.Context, p *Publication) error {
	if err := c.Stage(ctx, p); err != nil {
		return err
	}
	return c.Publish(ctx, p, false)
}

// Unpublish calls NodeUnpublishVolume if the volume was published.
func (c *Client) Unpublish(ctx context.Context, p *Publication) error {
	if !p.Published {
		return nil
	}
	if _, err := c.Node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: p.ID(), TargetPath: p.TargetPath}); err != nil {
		return fmt.Errorf("NodeUnpublishVolume %s: %w", p.ID(), err)
	}
	p.Published = false
	return nil
}

// Unstage calls NodeUnstageVolume if the volume was staged.
func (c *Client) Unstage(ctx context.Context, p *Publication) error {
	if !p.Staged {
		return nil
	}
	if _, err := c.Node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: p.ID(), StagingTargetPath: p.StagingPath}); err != nil {
		return fmt.Errorf("NodeUnstageVolume %s: %w", p.ID(), err)
	}
	p.Staged = false
	return nil
}

// UnpublishUnstage undoes StagePublish, as far as it got.
func (c *Client) UnpublishUnstage(ctx context.Context, p *Publication) error {
	if err := c.Unpublish(ctx, p); err != nil {
		return err
	}
	return c.Unstage(ctx, p)
}

// Teardown unpublishes and unstages every publication and deletes the
// volumes, newest first, going on after errors and returning them all.
func (c *Client) Teardown(ctx context.Context, pubs []*Publication, volumeIDs []string) error {
	var errs []error
	for i := len(pubs) - 1; i >= 0; i-- {
		if err := c.UnpublishUnstage(ctx, pubs[i]); err != nil {
			errs = append(errs, err)
		}
	}
	for i := len(volumeIDs) - 1; i >= 0; i-- {
		if _, err := c.Controller.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: volumeIDs[i]}); err != nil {
			errs = append(errs, fmt.Errorf("DeleteVolume %s: %w", volumeIDs[i], err))
		}
	}
	return errors.Join(errs...)
}
