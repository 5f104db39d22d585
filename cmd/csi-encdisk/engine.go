package main

import (
	"context"
	"errors"
	"io"
	"os"

	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/blockdev"
)

func runEngine(ctx context.Context, args []string) error {
	fs := newFlagSet("engine", "engine --volume-id ID --image PATH --run-dir DIR (--kms-endpoint unix://PATH --kms-id ID | --passphrase-file FILE | --plaintext --sector-size 512|4096) [--read-only] [--allow-discards]",
		"Serves the plaintext of one LUKS2 image's data segment as the FUSE file RUN_DIR/fuse/disk, with a\n"+
			"control socket at RUN_DIR/control.sock. The engine reads the image's header and gets the\n"+
			"passphrase itself (KMS unwrap of the header's token, or a passphrase file), so no other process\n"+
			"holds it; the volume key stays in its locked memory only. It reports how its start went on file\n"+
			"descriptor 3 when that is open. With --plaintext it serves an unencrypted volume (an RBD image\n"+
			"recorded unencrypted) as it is: no header, no KMS, no key. Started by the node service (and\n"+
			"'volume open'); not meant to be run by hand.")
	klog.InitFlags(fs)
	var spec blockdev.EngineSpec
	spec.RegisterFlags(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	defer klog.Flush()
	if fs.NArg() != 0 {
		return errors.New("engine takes no positional arguments")
	}
	// The report pipe is optional: by hand the engine just logs.
	var report io.WriteCloser
	if _, err := os.Stat("/proc/self/fd/3"); err == nil {
		report = os.NewFile(blockdev.ReportFD, "report-pipe")
	}
	return blockdev.RunEngine(ctx, spec, report)
}
