package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/bytesize"
	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
	"github.com/csi-encdisk/csi-encdisk/pkg/volumetool"
)

func runVolumeFormat(_ context.Context, args []string) error {
	fs := newFlagSet("volume format", "volume format IMAGE --size SIZE --key-file FILE [--sector-size 512|4096] [--key-is-random | --iter-time D --pbkdf-memory KIB] [-v N]",
		"Makes a new LUKS2 image (aes-xts-plain64, 512-bit random volume key, keyslot 0 unlocked by the key\n"+
			"file's bytes, as cryptsetup treats a key file). IMAGE must not exist; it is created sparse and\n"+
			"holds SIZE usable bytes after the 16 MiB header.\n"+
			"Keyslot 0 uses argon2id with a cost measured on this machine as cryptsetup's defaults do (about\n"+
			"--iter-time per unlock, at most --pbkdf-memory KiB and half the RAM, up to 4 threads): a key file\n"+
			"a person typed needs that. --key-is-random says the key file holds at least 256 bits from a\n"+
			"CSPRNG (e.g. head -c 32 /dev/urandom): then pbkdf2-sha256 with 1000 iterations, as the driver's\n"+
			"own keyslots, because no KDF cost makes such a key guessable or less so.")
	size := fs.String("size", "", "usable size after the header: "+bytesize.Syntax+" (required)")
	keyFile := fs.String("key-file", "", "file whose bytes are the passphrase of keyslot 0 (required)")
	sector := fs.Int("sector-size", 4096, "encryption sector size: 512 or 4096")
	random := fs.Bool("key-is-random", false, "the key file holds >= 32 bytes from a CSPRNG: fast pbkdf2 keyslot instead of argon2id")
	iterTime := fs.Duration("iter-time", crypt.DefaultArgon2Target, "argon2id: unlock time to aim for on this machine (as cryptsetup --iter-time)")
	memory := fs.Int("pbkdf-memory", crypt.DefaultArgon2MaxMemory, "argon2id: at most this much memory in KiB (as cryptsetup --pbkdf-memory)")
	applyVerbose := verboseFlag(fs)
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	applyVerbose()
	if len(pos) != 1 {
		return errors.New("want exactly one IMAGE argument")
	}
	if *size == "" || *keyFile == "" {
		return errors.New("--size and --key-file are required")
	}
	n, err := bytesize.Parse(*size)
	if err != nil {
		return fmt.Errorf("--size: %w", err)
	}
	if *sector != 512 && *sector != 4096 {
		return fmt.Errorf("--sector-size %d: want 512 or 4096", *sector)
	}
	if err := bytesize.SectorMultiple(*size, n, *sector); err != nil {
		return fmt.Errorf("--size: %w", err)
	}
	opts := volumetool.FormatOptions{SectorSize: *sector, KeyIsRandom: *random}
	if !*random {
		if *iterTime <= 0 || *iterTime > time.Hour {
			return fmt.Errorf("--iter-time %s: want more than 0 and at most 1h", *iterTime)
		}
		cost, err := crypt.MeasureArgon2id(*iterTime, *memory)
		if err != nil {
			return fmt.Errorf("--iter-time/--pbkdf-memory: %w", err)
		}
		opts.Argon2 = &cost
	}
	if err := volumetool.Format(pos[0], n, *keyFile, opts); err != nil {
		return err
	}
	if opts.Argon2 != nil {
		klog.InfoS("Keyslot 0 is argon2id", "passes", opts.Argon2.Time, "memoryKiB", opts.Argon2.MemoryKiB,
			"threads", opts.Argon2.Threads, "measuredFor", *iterTime)
	}
	return nil
}
