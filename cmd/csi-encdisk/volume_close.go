package main

import (
	"context"
	"errors"

	"github.com/csi-encdisk/csi-encdisk/pkg/blockdev"
)

func runVolumeClose(ctx context.Context, args []string) error {
	fs := newFlagSet("volume close", "volume close IMAGE [--run-dir DIR]",
		"Undoes 'volume open IMAGE': unmounts the filesystem it mounted, detaches the loop device and stops\n"+
			"the engine. Safe to repeat after a partial failure.")
	runDir := fs.String("run-dir", blockdev.DefaultOpenRunRoot, "the --run-dir given to 'volume open'")
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return errors.New("want exactly one IMAGE argument")
	}
	return blockdev.CloseVolume(ctx, pos[0], *runDir)
}
