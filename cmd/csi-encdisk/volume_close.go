package main

import (
	"context"
	"errors"

	"github.com/csi-encdisk/csi-encdisk/pkg/volumetool"
)

func runVolumeClose(ctx context.Context, args []string) error {
	fs := newFlagSet("volume close", "volume close IMAGE [--run-dir DIR]",
		"Undoes 'volume open IMAGE': unmounts the filesystem it mounted, detaches the loop device and stops\n"+
			"the engine. Closing an image that is not open does nothing, so it is safe to repeat.")
	runDir := fs.String("run-dir", volumetool.DefaultOpenRunRoot, "the --run-dir given to 'volume open'")
	applyVerbose := verboseFlag(fs)
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	applyVerbose()
	if len(pos) != 1 {
		return errors.New("want exactly one IMAGE argument")
	}
	return volumetool.Close(ctx, pos[0], *runDir)
}
