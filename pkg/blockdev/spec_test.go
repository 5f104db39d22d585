package blockdev

import (
	"flag"
	"reflect"
	"strings"
	"testing"
	"time"
)

// A run directory whose control socket would not fit sun_path is refused
// with a message that says so, before any engine starts.
func TestSpecRefusesLongSocketPath(t *testing.T) {
	s := EngineSpec{VolumeID: "v", Image: "/pool/v/image", RunDir: "/run/x", PassphraseFile: "/k"}
	if err := s.Validate(); err != nil {
		t.Fatalf("short run dir refused: %v", err)
	}
	s.RunDir = "/" + strings.Repeat("d", 100)
	err := s.Validate()
	if err == nil || !strings.Contains(err.Error(), "shorter state directory") {
		t.Fatalf("long run dir: %v", err)
	}
}

// Exactly one passphrase source.
func TestSpecOnePassphraseSource(t *testing.T) {
	s := EngineSpec{VolumeID: "v", Image: "/pool/v/image", RunDir: "/run/x"}
	if err := s.Validate(); err == nil {
		t.Fatal("a spec without a passphrase source was accepted")
	}
	s.KMSEndpoint, s.PassphraseFile = "unix:///kms.sock", "/k"
	if err := s.Validate(); err == nil {
		t.Fatal("a spec with two passphrase sources was accepted")
	}
}

// Args and RegisterFlags are one definition: every field survives the trip
// through argv.
func TestSpecArgsRoundTrip(t *testing.T) {
	in := EngineSpec{VolumeID: "vol 1", Image: "/pool/a b/image", RunDir: "/run/x",
		KMSEndpoint: "unix:///kms.sock", KMSID: "eu", KMSTimeout: 3 * time.Second,
		ReadOnly: true, AllowDiscards: true, BufferedBacking: true}
	args := in.Args()
	if args[0] != "engine" {
		t.Fatalf("args %q", args)
	}
	var out EngineSpec
	fs := flag.NewFlagSet("engine", flag.ContinueOnError)
	out.RegisterFlags(fs)
	if err := fs.Parse(args[1:]); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(in, out) {
		t.Fatalf("round trip:\n in %+v\nout %+v", in, out)
	}
}
