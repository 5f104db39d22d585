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

// A plaintext spec takes no passphrase source and needs a sector size of
// 512 or 4096; an encrypted one takes no sector size (its header has it).
func TestSpecPlaintext(t *testing.T) {
	base := EngineSpec{VolumeID: "v", Image: "/pool/v/image", RunDir: "/run/x", Plaintext: true, SectorSize: 4096}
	if err := base.Validate(); err != nil {
		t.Fatalf("plaintext spec refused: %v", err)
	}
	for name, mod := range map[string]func(*EngineSpec){
		"kms endpoint":    func(s *EngineSpec) { s.KMSEndpoint = "unix:///kms.sock" },
		"kms id":          func(s *EngineSpec) { s.KMSID = "eu" },
		"passphrase file": func(s *EngineSpec) { s.PassphraseFile = "/k" },
		"no sector size":  func(s *EngineSpec) { s.SectorSize = 0 },
		"sector size 1k":  func(s *EngineSpec) { s.SectorSize = 1024 },
		"encrypted with a sector size": func(s *EngineSpec) {
			s.Plaintext, s.PassphraseFile = false, "/k"
		},
	} {
		s := base
		mod(&s)
		if err := s.Validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// Args and RegisterFlags are one definition: every field survives the trip
// through argv.
func TestSpecArgsRoundTrip(t *testing.T) {
	in := EngineSpec{VolumeID: "vol 1", Image: "/pool/a b/image", RunDir: "/run/x",
		KMSEndpoint: "unix:///kms.sock", KMSID: "eu", KMSTimeout: 3 * time.Second,
		ReadOnly: true, AllowDiscards: true, BufferedBacking: true}
	plain := EngineSpec{VolumeID: "vol 2", Image: "rbd:kube/vol-1", RunDir: "/run/y", Plaintext: true, SectorSize: 512}
	for _, in := range []EngineSpec{in, plain} {
		roundTrip(t, in)
	}
}

func roundTrip(t *testing.T, in EngineSpec) {
	t.Helper()
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
