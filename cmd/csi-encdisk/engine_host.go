package main

import (
	"context"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/enginehost"
	"github.com/csi-encdisk/csi-encdisk/pkg/unixsock"
)

func runEngineHost(ctx context.Context, args []string) error {
	if len(args) > 0 && args[0] == "probe" {
		return runEngineHostProbe(ctx, args[1:])
	}
	fs := newFlagSet("engine-host", "engine-host --socket unix://PATH --state-dir DIR\n       csi-encdisk engine-host probe --socket unix://PATH",
		"Runs the node's engine host: it mounts each encrypted volume's FUSE file, keeps the connection,\n"+
			"and runs the volume's engine on it; an engine that dies is replaced on the same connection\n"+
			"without I/O errors (a volume whose engine dies 5 times a minute is left down). A new host\n"+
			"takes over from a running one on the same socket (an upgrade) and replaces every engine by one\n"+
			"of its own binary. Stopping the host leaves the engines serving. The node plugin uses it with\n"+
			"'driver --engine-host'. Engines unwrap their keys through the KMS; the host holds no volume key.\n"+
			"For a volume in Ceph RBD it keeps the cephx credentials in (locked) memory only, to start\n"+
			"replacement engines; after a restart it gets them back from the running engines.")
	socket := fs.String("socket", "unix:///run/csi-encdisk/engine-host.sock", "unix socket to serve the node plugin on")
	stateDir := fs.String("state-dir", "/var/lib/csi-encdisk/engine-host", "where the host keeps its records of the engines (no secrets: Ceph credentials stay in memory)")
	klog.InitFlags(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	defer klog.Flush()
	path, err := unixsock.ParseEndpoint(*socket)
	if err != nil {
		return fmt.Errorf("--socket: %w", err)
	}
	// It may hold Ceph credentials (RBD volumes): keep its memory out of
	// swap, as the engines do.
	if err := unix.Mlockall(unix.MCL_CURRENT | unix.MCL_FUTURE | unix.MCL_ONFAULT); err != nil {
		klog.ErrorS(err, "mlockall failed; the Ceph credentials the host keeps could be swapped out")
	}
	bin, err := os.Executable()
	if err != nil {
		return fmt.Errorf("finding the engine binary: %w", err)
	}
	h, err := enginehost.New(enginehost.Config{Binary: bin, StateDir: *stateDir})
	if err != nil {
		return err
	}
	// Take the socket first: a running host hands over (and stops
	// supervising) before this one adopts its engines.
	if err := h.ServeAdopting(ctx, path); err != nil {
		return err
	}
	if ctx.Err() == nil {
		// Handed over to a successor: stay (idle) until stopped, so that a
		// restart of this container does not take the socket back.
		klog.InfoS("Engine host handed over to a successor; idle until stopped")
		<-ctx.Done()
	}
	return nil
}

// runEngineHostProbe exits 0 when the engine host answers and every engine
// runs its binary (the readiness probe of a rollout).
func runEngineHostProbe(ctx context.Context, args []string) error {
	fs := newFlagSet("engine-host probe", "engine-host probe --socket unix://PATH",
		"Exits 0 when the engine host on the socket serves and has finished adopting and upgrading\n"+
			"its engines: the readiness probe of the engine host's pods.")
	socket := fs.String("socket", "unix:///run/csi-encdisk/engine-host.sock", "the engine host's socket")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	path, err := unixsock.ParseEndpoint(*socket)
	if err != nil {
		return fmt.Errorf("--socket: %w", err)
	}
	return enginehost.Client{Socket: path}.Ready(ctx)
}
