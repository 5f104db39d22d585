package main

import (
	"context"
	"errors"
	"os"

	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/blockdev"
)

// keyFD is the inherited descriptor that carries the volume key.
const keyFD = 3

func runEngine(ctx context.Context, args []string) error {
	fs := newFlagSet("engine", "engine --image PATH --data-offset N --sector-size N [--allow-discards] --run-dir DIR --volume-id ID",
		"Serves the plaintext of one LUKS2 image's data segment as the FUSE file RUN_DIR/fuse/disk, with a\n"+
			"control socket at RUN_DIR/control.sock. The volume key (32 or 64 bytes) is read from file\n"+
			"descriptor 3, an inherited pipe; it is never taken from flags, environment or files. Started by\n"+
			"the node service (and 'volume open'); not meant to be run by hand.")
	klog.InitFlags(fs)
	var spec blockdev.EngineSpec
	fs.StringVar(&spec.Image, "image", "", "absolute path of the LUKS2 image (required)")
	fs.Int64Var(&spec.DataOffset, "data-offset", 0, "byte offset of the data segment in the image (required)")
	fs.IntVar(&spec.SectorSize, "sector-size", 0, "encryption sector size: 512 or 4096 (required)")
	fs.BoolVar(&spec.AllowDiscards, "allow-discards", false, "punch holes on discard; all-zero ciphertext sectors read as zeros")
	fs.StringVar(&spec.RunDir, "run-dir", "", "absolute per-volume directory for the FUSE mount and control socket (required)")
	fs.StringVar(&spec.VolumeID, "volume-id", "", "volume ID, for logs (required)")
	fs.BoolVar(&spec.BufferedBacking, "buffered-backing", false, "open the image without O_DIRECT (for measurements)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	defer klog.Flush()
	if fs.NArg() != 0 {
		return errors.New("engine takes no positional arguments")
	}
	keyPipe := os.NewFile(keyFD, "key-pipe")
	if keyPipe == nil {
		return errors.New("file descriptor 3 (the key pipe) is not open")
	}
	return blockdev.RunEngine(ctx, spec, keyPipe)
}
