package main

import (
	"context"
	"errors"

	"github.com/csi-encdisk/csi-encdisk/pkg/volumetool"
)

func runVolumeFormat(_ context.Context, args []string) error {
	fs := newFlagSet("volume format", "volume format IMAGE --size SIZE --key-file FILE [--sector-size 512|4096]",
		"Makes a new LUKS2 image (aes-xts-plain64, 512-bit random volume key, keyslot 0 unlocked by the key\n"+
			"file's bytes, as cryptsetup treats a key file). IMAGE must not exist; it is created sparse and\n"+
			"holds SIZE usable bytes after the 16 MiB header.")
	size := fs.String("size", "", "usable size after the header: bytes, or with K, M, G, T (or Ki, Mi, Gi, Ti) suffix (required)")
	keyFile := fs.String("key-file", "", "file whose bytes are the passphrase of keyslot 0 (required)")
	sector := fs.Int("sector-size", 4096, "encryption sector size: 512 or 4096")
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return errors.New("want exactly one IMAGE argument")
	}
	if *size == "" || *keyFile == "" {
		return errors.New("--size and --key-file are required")
	}
	n, err := volumetool.ParseSize(*size)
	if err != nil {
		return err
	}
	return volumetool.Format(pos[0], n, *keyFile, *sector)
}
