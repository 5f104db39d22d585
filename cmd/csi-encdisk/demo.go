package main

import (
	"context"
	"fmt"
	"os"

	"github.com/csi-encdisk/csi-encdisk/pkg/bytesize"
	"github.com/csi-encdisk/csi-encdisk/pkg/demo"
)

func runDemo(ctx context.Context, args []string) error {
	fs := newFlagSet("demo", "demo [--keep] [--dir DIR] [--size SIZE]",
		"Starts the built-in KMS plugin and the driver (--mode all) in a temporary directory, then acts as\n"+
			"the CSI client: creates an encrypted volume, stages and publishes it, writes a file, shows that\n"+
			"the pool holds no plaintext, snapshots, restores, refuses a conversion, rotates the master key,\n"+
			"deletes everything and shows the crypto-shredded header. Prints a table; exits 0 only if every\n"+
			"check held. Needs root, /dev/fuse, a free loop device and mkfs.ext4.")
	keep := fs.Bool("keep", false, "keep the temporary directory (logs, pool) after the run")
	dir := fs.String("dir", "", "parent directory of the temporary directory (default: the system's temp dir)")
	sizeText := fs.String("size", "1Gi", "size of the encrypted volume: "+bytesize.Syntax)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	size, err := bytesize.Parse(*sizeText)
	if err != nil {
		return fmt.Errorf("--size: %w", err)
	}
	if err := bytesize.SectorMultiple(*sizeText, size, 4096); err != nil {
		return fmt.Errorf("--size: %w", err)
	}
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find own executable: %w", err)
	}
	return demo.Run(ctx, demo.Options{Binary: self, Out: os.Stdout, Dir: *dir, Keep: *keep, VolumeSize: size})
}
