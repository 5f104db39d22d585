// Command fiodriver sets up the two volumes bench/fio-driver.sh measures: it
// starts a built csi-encdisk driver in --mode all (built-in KMS), acts as the
// CSI client Kubernetes would be, and creates, stages and publishes (ext4)
// one encrypted and one unencrypted volume of the same size. When both are
// mounted it prints
//
//	enc=/path/of/the/encrypted/mount
//	plain=/path/of/the/unencrypted/mount
//	ready
//
// on stdout and waits for SIGTERM, SIGINT or end of stdin; then it
// unpublishes, unstages and deletes both volumes and stops the driver. It
// tears down whatever it set up on every exit path, a failed setup included.
//
// Usage: fiodriver -bin PATH/csi-encdisk -dir DIR [-size 2147483648]
package main

import (
	"github.com/csi-encdisk/csi-encdisk/pkg/bytesize"

	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

const (
	region    = "bench"
	regionKey = "topology.encdisk.csi.io/region"
)

func main() {
	bin := flag.String("bin", "", "path of a built csi-encdisk binary (required)")
	dir := flag.String("dir", "", "working directory for the driver's socket, data, state and mounts (required)")
	size := bytesize.Flag(flag.CommandLine, "size", 2<<30, "size of each volume")
	flag.Parse()
	if *bin == "" || *dir == "" || flag.NArg() > 0 {
		fmt.Fprintln(os.Stderr, "usage: fiodriver -bin PATH/csi-encdisk -dir DIR [-size SIZE]")
		os.Exit(2)
	}
	if err := bytesize.SectorMultiple(fmt.Sprint(*size), *size, 4096); err != nil {
		fmt.Fprintf(os.Stderr, "fiodriver: -size: %v\n", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := run(ctx, *bin, *dir, *size); err != nil {
		fmt.Fprintf(os.Stderr, "fiodriver: %v\n", err)
		os.Exit(1)
	}
}

// bench holds what teardown must undo.
type bench struct {
	dir    string
	driver *exec.Cmd
	done   chan struct{} // closed when the driver has exited
	conn   *grpc.ClientConn
	ctrl   csi.ControllerClient
	node   csi.NodeClient
	vols   []*volume
}

// volume is one created volume and how far it got.
type volume struct {
	id, staging, target string
	context             map[string]string
	staged, published   bool
}

func run(ctx context.Context, bin, dir string, size int64) (err error) {
	b := &bench{dir: dir}
	defer func() {
		if terr := b.teardown(); terr != nil {
			err = errors.Join(err, terr)
		}
	}()
	if err := b.start(ctx, bin); err != nil {
		return err
	}
	for _, v := range []struct {
		label, encrypted string
	}{{"enc", "true"}, {"plain", "false"}} {
		vol, err := b.create(ctx, "fio-"+v.label, size, v.encrypted)
		if err != nil {
			return fmt.Errorf("create %s volume: %w", v.label, err)
		}
		if err := b.stagePublish(ctx, vol, v.label); err != nil {
			return fmt.Errorf("stage and publish %s volume: %w", v.label, err)
		}
		fmt.Printf("%s=%s\n", v.label, vol.target)
	}
	fmt.Println("ready")

	// Wait for a signal or the end of stdin.
	eof := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		close(eof)
	}()
	select {
	case <-ctx.Done():
	case <-eof:
	case <-b.done:
		return errors.New("the driver exited while the volumes were in use (see driver.log)")
	}
	return nil
}

// start runs the driver and connects to it.
func (b *bench) start(ctx context.Context, bin string) error {
	if err := os.MkdirAll(b.dir, 0o750); err != nil {
		return fmt.Errorf("make %s: %w", b.dir, err)
	}
	logPath := filepath.Join(b.dir, "driver.log")
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("open driver log: %w", err)
	}
	sock := filepath.Join(b.dir, "csi.sock")
	cmd := exec.Command(bin, "driver", "--mode", "all", "--endpoint", "unix://"+sock,
		"--data-dir", filepath.Join(b.dir, "data"), "--state-dir", filepath.Join(b.dir, "state"),
		"--node-id", "bench", "--region", region)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	// Own process group: a Ctrl-C reaches fiodriver, which then tears down in
	// order while the driver still serves.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return fmt.Errorf("start driver: %w", err)
	}
	b.driver = cmd
	b.done = make(chan struct{})
	go func() {
		_ = cmd.Wait()
		logFile.Close()
		close(b.done)
	}()

	wctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	for {
		c, err := net.Dial("unix", sock)
		if err == nil {
			c.Close()
			break
		}
		select {
		case <-b.done:
			return fmt.Errorf("driver exited before serving %s (see %s)", sock, logPath)
		case <-wctx.Done():
			return fmt.Errorf("waiting for the driver on %s: %w", sock, wctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("connect to the driver: %w", err)
	}
	b.conn = conn
	b.ctrl = csi.NewControllerClient(conn)
	b.node = csi.NewNodeClient(conn)
	id := csi.NewIdentityClient(conn)
	for {
		probe, err := id.Probe(wctx, &csi.ProbeRequest{})
		if err == nil && (probe.GetReady() == nil || probe.GetReady().GetValue()) {
			return nil
		}
		select {
		case <-wctx.Done():
			return fmt.Errorf("driver not ready: %v (%w)", err, wctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func mountCapability() *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: "ext4"}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
}

// create asks the controller for a volume and remembers it for teardown.
func (b *bench) create(ctx context.Context, name string, size int64, encrypted string) (*volume, error) {
	resp, err := b.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{
		Name:               name,
		CapacityRange:      &csi.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csi.VolumeCapability{mountCapability()},
		Parameters:         map[string]string{"encrypted": encrypted},
		AccessibilityRequirements: &csi.TopologyRequirement{
			Preferred: []*csi.Topology{{Segments: map[string]string{regionKey: region}}},
		},
	})
	if err != nil {
		return nil, fmt.Errorf("CreateVolume: %w", err)
	}
	v := &volume{id: resp.GetVolume().GetVolumeId(), context: resp.GetVolume().GetVolumeContext()}
	b.vols = append(b.vols, v)
	return v, nil
}

// stagePublish stages and publishes v as ext4 under DIR/staging and DIR/pods.
func (b *bench) stagePublish(ctx context.Context, v *volume, label string) error {
	v.staging = filepath.Join(b.dir, "staging", label)
	v.target = filepath.Join(b.dir, "pods", label)
	if err := os.MkdirAll(v.staging, 0o750); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(v.target), 0o750); err != nil {
		return err
	}
	if _, err := b.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{
		VolumeId:          v.id,
		StagingTargetPath: v.staging,
		VolumeCapability:  mountCapability(),
		VolumeContext:     v.context,
	}); err != nil {
		// A failed stage may have left pieces; unstage is idempotent.
		v.staged = true
		return fmt.Errorf("NodeStageVolume: %w", err)
	}
	v.staged = true
	if _, err := b.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{
		VolumeId:          v.id,
		StagingTargetPath: v.staging,
		TargetPath:        v.target,
		VolumeCapability:  mountCapability(),
		VolumeContext:     v.context,
	}); err != nil {
		v.published = true
		return fmt.Errorf("NodePublishVolume: %w", err)
	}
	v.published = true
	return nil
}

// teardown unpublishes, unstages and deletes every volume, newest first,
// then stops the driver. It goes on after an error and returns them all.
func (b *bench) teardown() error {
	// A fresh context: the run's may be cancelled by the very signal that
	// asked for the teardown.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var errs []error
	for i := len(b.vols) - 1; i >= 0 && b.conn != nil; i-- {
		v := b.vols[i]
		if v.published {
			if _, err := b.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target}); err != nil {
				errs = append(errs, fmt.Errorf("NodeUnpublishVolume %s: %w", v.id, err))
				continue
			}
		}
		if v.staged {
			if _, err := b.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging}); err != nil {
				errs = append(errs, fmt.Errorf("NodeUnstageVolume %s: %w", v.id, err))
				continue
			}
		}
		if _, err := b.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.id}); err != nil {
			errs = append(errs, fmt.Errorf("DeleteVolume %s: %w", v.id, err))
		}
	}
	if b.conn != nil {
		b.conn.Close()
	}
	if b.driver != nil {
		select {
		case <-b.done:
		default:
			_ = b.driver.Process.Signal(syscall.SIGTERM)
			select {
			case <-b.done:
			case <-time.After(30 * time.Second):
				_ = b.driver.Process.Kill()
				<-b.done
				errs = append(errs, errors.New("driver did not stop within 30s of SIGTERM; killed"))
			}
		}
	}
	return errors.Join(errs...)
}
