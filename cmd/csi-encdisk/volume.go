package main

import (
	"context"
	"fmt"
	"os"
)

// volumeCommands are the subcommands of "csi-encdisk volume"; each lives in
// its own file.
func volumeCommands() map[string]command {
	return map[string]command{
		"format":  {"make a new LUKS2 image (passphrase from a key file)", runVolumeFormat},
		"inspect": {"print an image's LUKS2 header and tokens (never key material)", runVolumeInspect},
		"open":    {"unlock an image and attach it as a loop device (recovery outside Kubernetes)", runVolumeOpen},
		"close":   {"undo 'volume open'", runVolumeClose},
	}
}

func runVolume(ctx context.Context, args []string) error {
	cmds := volumeCommands()
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" {
		out := os.Stderr
		if len(args) > 0 {
			out = os.Stdout
		}
		fmt.Fprintf(out, "Usage: csi-encdisk volume SUBCOMMAND [flags] IMAGE\n\nSubcommands:\n")
		for _, n := range []string{"format", "inspect", "open", "close"} {
			fmt.Fprintf(out, "  %-8s %s\n", n, cmds[n].summary)
		}
		if len(args) == 0 {
			return errUsage
		}
		return nil
	}
	cmd, ok := cmds[args[0]]
	if !ok {
		return fmt.Errorf("unknown subcommand %q (format, inspect, open, close)", args[0])
	}
	return cmd.run(ctx, args[1:])
}
