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

	"github.com/csi-encdisk/csi-encdisk/pkg/csiclient"
)

const region = "bench"

func main() {
	bin := flag.String("bin", "", "path of a built csi-encdisk binary (required)")
	dir := flag.String("dir", "", "working directory for the driver's socket, data, state and mounts (required)")
	size := bytesize.Flag(flag.CommandLine, "size", 2<<30, "size of each volume")
	transport := flag.String("fuse-transport", "classic", "the driver's --fuse-transport (classic or io_uring)")
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
	if err := run(ctx, *bin, *dir, *size, *transport); err != nil {
		fmt.Fprintf(os.Stderr, "fiodriver: %v\n", err)
		os.Exit(1)
	}
}

// bench holds what teardown must undo.
type bench struct {
	dir    string
	driver *exec.Cmd
	done   chan struct{} // closed when the driver has exited
	client *csiclient.Client
	pubs   []*csiclient.Publication
	vols   []string
}

func run(ctx context.Context, bin, dir string, size int64, transport string) (err error) {
	b := &bench{dir: dir}
	defer func() {
		if terr := b.teardown(); terr != nil {
			err = errors.Join(err, terr)
		}
	}()
	if err := b.start(ctx, bin, transport); err != nil {
		return err
	}
	for _, v := range []struct {
		label, encrypted string
	}{{"enc", "true"}, {"plain", "false"}} {
		vol, err := b.client.CreateVolume(ctx, csiclient.VolumeRequest{Name: "fio-" + v.label, Size: size, Access: "ext4",
			Parameters: map[string]string{"encrypted": v.encrypted}, Region: region})
		if err != nil {
			return fmt.Errorf("create %s volume: %w", v.label, err)
		}
		b.vols = append(b.vols, vol.GetVolumeId())
		p, err := csiclient.NewPublication(vol, "ext4", b.dir, v.label)
		if err != nil {
			return err
		}
		b.pubs = append(b.pubs, p)
		if err := b.client.StagePublish(ctx, p); err != nil {
			return fmt.Errorf("stage and publish %s volume: %w", v.label, err)
		}
		fmt.Printf("%s=%s\n", v.label, p.TargetPath)
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
func (b *bench) start(ctx context.Context, bin, transport string) error {
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
		"--node-id", "bench", "--region", region, "--fuse-transport", transport)
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
	if b.client, err = csiclient.Dial(sock); err != nil {
		return err
	}
	return b.client.WaitReady(wctx, false)
}

// teardown unpublishes, unstages and deletes every volume, newest first,
// then stops the driver. It goes on after an error and returns them all.
func (b *bench) teardown() error {
	// A fresh context: the run's may be cancelled by the very signal that
	// asked for the teardown.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var errs []error
	if b.client != nil {
		errs = append(errs, b.client.Teardown(ctx, b.pubs, b.vols))
		b.client.Close()
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
