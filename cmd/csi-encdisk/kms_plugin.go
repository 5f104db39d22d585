package main

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/csi-encdisk/csi-encdisk/pkg/kmsplugin"
)

const createKeystoreHelp = "create a dir: keystore that does not exist yet (mode 0700); without it a missing directory is refused, so a typo never becomes a new, empty keystore"

// openKeystore opens a keystore; create allows making a missing dir: one.
func openKeystore(spec string, create bool) (kmsplugin.Keystore, error) {
	if create {
		return kmsplugin.InitKeystore(spec)
	}
	return kmsplugin.OpenKeystore(spec)
}

const keystoreHelp = "where master keys live: dir:/abs/path (0600 files) or pkcs11:/path/module.so?token=LABEL&pin-file=/path/pin (keys stay in the token)"

func runKMSPlugin(ctx context.Context, args []string) error {
	if len(args) > 0 && args[0] == "rotate" {
		return runKMSRotate(args[1:])
	}
	if len(args) > 0 && (args[0] == "disable-version" || args[0] == "enable-version") {
		return runKMSDisable(args[0], args[1:])
	}
	fs := newFlagSet("kms-plugin", "kms-plugin --listen unix://PATH --region REGION --keystore SPEC [--create-keystore]\n       csi-encdisk kms-plugin rotate --keystore SPEC --region REGION [--create-keystore]\n       csi-encdisk kms-plugin disable-version|enable-version --keystore SPEC --region REGION --version N",
		"Serves the Kubernetes KMS v2 plugin API (Status, Encrypt, Decrypt) on a unix socket with one\n"+
			"AES-256-GCM master key per region, created on the region's first Encrypt and never deleted.\n"+
			"'rotate' adds a new master key version: Encrypt uses it, Decrypt still opens older ones.\n"+
			"A dir: keystore must exist (or give --create-keystore). The socket path may hold a stale socket\n"+
			"(removed once a connect to it fails), never anything else. Stops gracefully on SIGTERM and\n"+
			"removes its socket.")
	listen := fs.String("listen", "", "unix socket to serve on, unix:///abs/path (required)")
	region := fs.String("region", "", "region whose master key this plugin uses (required)")
	keystore := fs.String("keystore", "", keystoreHelp+" (required)")
	create := fs.Bool("create-keystore", false, createKeystoreHelp)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *listen == "" || *region == "" || *keystore == "" {
		return errors.New("--listen, --region and --keystore are required")
	}
	ks, err := openKeystore(*keystore, *create)
	if err != nil {
		return err
	}
	defer ks.Close()
	svc, err := kmsplugin.NewService(*region, ks)
	if err != nil {
		return err
	}
	return kmsplugin.Serve(ctx, *listen, svc)
}

func runKMSRotate(args []string) error {
	fs := newFlagSet("kms-plugin rotate", "kms-plugin rotate --keystore SPEC --region REGION [--create-keystore] [-v N]",
		"Adds a new master key version to REGION and prints its key_id. A running plugin on the same\n"+
			"keystore uses it for the next Encrypt; every older version still decrypts.")
	region := fs.String("region", "", "region to rotate (required)")
	keystore := fs.String("keystore", "", keystoreHelp+" (required)")
	create := fs.Bool("create-keystore", false, createKeystoreHelp)
	applyVerbose := verboseFlag(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	applyVerbose()
	if *region == "" || *keystore == "" {
		return errors.New("--region and --keystore are required")
	}
	ks, err := openKeystore(*keystore, *create)
	if err != nil {
		return err
	}
	defer ks.Close()
	id, err := kmsplugin.Rotate(ks, *region)
	if err != nil {
		return err
	}
	fmt.Println(id)
	return nil
}

func runKMSDisable(name string, args []string) error {
	fs := newFlagSet("kms-plugin "+name, "kms-plugin "+name+" --keystore SPEC --region REGION --version N",
		"disable-version makes Decrypt under master key version N fail (FailedPrecondition) without deleting\n"+
			"the key; enable-version undoes it. Run 'csi-encdisk keys status' first: a version still referenced\n"+
			"by a volume or snapshot must stay enabled. The current (newest) version cannot be disabled.")
	region := fs.String("region", "", "region of the key (required)")
	keystore := fs.String("keystore", "", keystoreHelp+" (required)")
	v := fs.Int("version", 0, "master key version N (key_id REGION/vN) (required)")
	applyVerbose := verboseFlag(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	applyVerbose()
	if *region == "" || *keystore == "" || *v < 1 {
		return errors.New("--region, --keystore and --version (1 or more) are required")
	}
	ks, err := kmsplugin.OpenKeystore(*keystore)
	if err != nil {
		return err
	}
	defer ks.Close()
	if err := kmsplugin.SetVersionDisabled(ks, *region, *v, name == "disable-version"); err != nil {
		return err
	}
	fmt.Printf("%s %sd\n", kmsplugin.KeyID(*region, *v), strings.TrimSuffix(name, "-version"))
	return nil
}
