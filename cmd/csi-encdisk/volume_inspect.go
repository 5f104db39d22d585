package main

import (
	"context"
	"errors"
	"os"

	"github.com/csi-encdisk/csi-encdisk/pkg/volumetool"
)

func runVolumeInspect(_ context.Context, args []string) error {
	fs := newFlagSet("volume inspect", "volume inspect IMAGE [--json]",
		"Prints an image's LUKS2 header: segment, keyslots (parameters only, never key material),\n"+
			"digests and tokens (the KMS token's wrapped passphrase is shortened). Works on any LUKS2 image.")
	asJSON := fs.Bool("json", false, "print JSON instead of text")
	applyVerbose := verboseFlag(fs)
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	applyVerbose()
	if len(pos) != 1 {
		return errors.New("want exactly one IMAGE argument")
	}
	return volumetool.Inspect(pos[0], *asJSON, os.Stdout)
}
