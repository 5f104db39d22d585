package main

import (
	"context"
	"fmt"
	"os"

	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/enginehost"
	"github.com/csi-encdisk/csi-encdisk/pkg/unixsock"
)

func runEngineHost(ctx context.Context, args []string) error {
	fs := newFlagSet("engine-host", "engine-host --socket unix://PATH --state-dir DIR",
		"Runs the node's engine host: it mounts each encrypted volume's FUSE file, keeps the connection,\n"+
			"and runs the volume's engine on it; an engine that dies is replaced on the same connection\n"+
			"without I/O errors (a volume whose engine dies 5 times a minute is left down). A new host\n"+
			"takes over from a running one on the same socket (an upgrade) and replaces every engine by one\n"+
			"of its own binary. Stopping the host leaves the engines serving. The node plugin uses it with\n"+
			"'driver --engine-host'. Holds no secret: engines unwrap their keys through the KMS.")
	socket := fs.String("socket", "unix:///run/csi-encdisk/engine-host.sock", "unix socket to serve the node plugin on")
	stateDir := fs.String("state-dir", "/var/lib/csi-encdisk/engine-host", "where the host keeps its records of the engines (no secrets)")
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
	return h.ServeAdopting(ctx, path)
}
