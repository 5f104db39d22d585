package main

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/csi-encdisk/csi-encdisk/pkg/volumetool"
)

func runVolumeOpen(ctx context.Context, args []string) error {
	fs := newFlagSet("volume open", "volume open IMAGE (--key-file FILE | --kms-endpoint unix://PATH) (--mount DIR | --block) [--run-dir DIR] [-v N]",
		"Unlocks a LUKS2 aes-xts-plain64 image (made by csi-encdisk or cryptsetup), starts the userspace\n"+
			"encryption engine for it, attaches a loop device and prints the device (the only output). With\n"+
			"--mount the filesystem on the volume is mounted at DIR; a volume without one is never formatted.\n"+
			"One writer per image: while an engine serves the image (this command, or a node that staged it)\n"+
			"a second open fails naming the holder. 'volume close IMAGE' undoes it. Needs root.")
	keyFile := fs.String("key-file", "", "file whose bytes are the passphrase (as cryptsetup reads a key file)")
	kms := fs.String("kms-endpoint", "", "unwrap the passphrase in the header's KMS token through this KMS v2 plugin (unix:///path)")
	mount := fs.String("mount", "", "mount the volume's filesystem on this directory")
	block := fs.Bool("block", false, "only attach the block device")
	runDir := fs.String("run-dir", volumetool.DefaultOpenRunRoot, "directory for the engine's mount, socket and state (no secrets)")
	buffered := fs.Bool("buffered-backing", false, "engine reads and writes the image without O_DIRECT (for measurements)")
	applyVerbose := verboseFlag(fs)
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	applyVerbose()
	if len(pos) != 1 {
		return errors.New("want exactly one IMAGE argument")
	}
	if (*keyFile == "") == (*kms == "") {
		return errors.New("give exactly one of --key-file and --kms-endpoint")
	}
	if (*mount == "") == !*block {
		return errors.New("give exactly one of --mount DIR and --block")
	}
	bin, err := os.Executable()
	if err != nil {
		return fmt.Errorf("finding the engine binary: %w", err)
	}
	v, err := volumetool.Open(ctx, volumetool.OpenOptions{Image: pos[0], KeyFile: *keyFile, KMSEndpoint: *kms,
		MountDir: *mount, RunRoot: *runDir, EngineBinary: bin, BufferedBacking: *buffered})
	if err != nil {
		return err
	}
	fmt.Println(v.Loop)
	return nil
}
