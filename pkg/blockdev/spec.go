package blockdev

import (
	"errors"
	"flag"
	"fmt"
	"path/filepath"
	"time"

	"github.com/csi-encdisk/csi-encdisk/pkg/rbd"
)

// EngineSpec says which image an engine serves, how it gets the image's
// passphrase (or that the volume is unencrypted), and how it serves it. It
// holds no secret: it becomes the engine's argv (Args) and is parsed back
// there (RegisterFlags), from one definition of the flags.
type EngineSpec struct {
	VolumeID string
	Image    string // absolute path of the LUKS2 image, or rbd:POOL/IMAGE (imageio.go)
	RunDir   string // per-volume dir: FUSE mount RunDir/fuse, control socket RunDir/control.sock

	// Plaintext serves an unencrypted volume: the image has no LUKS2
	// header and no encryption, its data starts at offset 0, and there is
	// no KMS, passphrase or key. It is chosen from the volume (its volume
	// context), never from the image's contents, and the engine refuses an
	// image whose volume record says otherwise (ErrEncryptionMismatch).
	// SectorSize is then the served file's sector size (512 or 4096); an
	// encrypted volume's comes from its header.
	Plaintext  bool
	SectorSize int

	// Without Plaintext, the passphrase comes from exactly one of these.
	// KMSEndpoint: the engine unwraps the header's csi-encdisk-kms token
	// through this KMS v2 plugin (KMSID must match the token's kms_id).
	// PassphraseFile: a file whose bytes are the passphrase, as cryptsetup
	// reads a key file (volume open of images made by hand).
	KMSEndpoint    string
	KMSID          string
	KMSTimeout     time.Duration
	PassphraseFile string

	// ReadOnly: the engine never writes the image's header (no re-wrap after
	// a master key rotation). Data writes are refused by the loop device.
	ReadOnly bool
	// AllowDiscards: punch holes on discard; all-zero ciphertext reads as zeros.
	AllowDiscards bool
	// BufferedBacking opens the image without O_DIRECT (for measurements;
	// the default, O_DIRECT, avoids caching every block twice).
	BufferedBacking bool

	// FUSEFD is an inherited /dev/fuse descriptor whose connection a
	// supervisor mounted (0: the engine mounts RunDir/fuse itself); Session
	// is that connection's fuseserve.Session as JSON. Resend asks the kernel
	// to deliver again the requests a dead predecessor had read.
	FUSEFD  int
	Session string
	Resend  bool
	// FUSEClones descriptors follow FUSEFD (FUSEFD+1, ...): clones of its
	// connection (fuseserve.Clone) that the supervisor holds copies of too;
	// the engine's fast path reads them, one reader each.
	FUSEClones int
	// FUSETransport is how the engine it mounts itself gets FUSE requests:
	// "classic" (read and write on /dev/fuse; the default, and the only one
	// a supervisor can take over after a crash) or "io_uring"
	// (FUSE-over-io_uring: fewer system calls per request, but a crashed
	// engine strands the requests it held; needs the fuse module's
	// enable_uring=Y, else the engine serves classic and logs why).
	FUSETransport string
}

// FUSE transports (EngineSpec.FUSETransport).
const (
	TransportClassic = "classic"
	TransportIOURing = "io_uring"
)

// RegisterFlags defines the engine's flags on fs, bound to s.
func (s *EngineSpec) RegisterFlags(fs *flag.FlagSet) {
	fs.StringVar(&s.VolumeID, "volume-id", "", "volume ID, for logs (required)")
	fs.StringVar(&s.Image, "image", "", "absolute path of the LUKS2 image, or rbd:POOL/IMAGE (credentials on fd 4) (required)")
	fs.StringVar(&s.RunDir, "run-dir", "", "absolute per-volume directory for the FUSE mount and control socket (required)")
	fs.BoolVar(&s.Plaintext, "plaintext", false, "serve an unencrypted volume as it is (no LUKS2 header, no KMS, data at offset 0); its volume record must say unencrypted")
	fs.IntVar(&s.SectorSize, "sector-size", 0, "sector size of a --plaintext volume: 512 or 4096")
	fs.StringVar(&s.KMSEndpoint, "kms-endpoint", "", "unwrap the header's KMS token through this KMS v2 plugin (unix:///path)")
	fs.StringVar(&s.KMSID, "kms-id", "", "the kmsID the token must name (with --kms-endpoint)")
	fs.DurationVar(&s.KMSTimeout, "kms-timeout", 0, "bound of each KMS call (0: the client's default)")
	fs.StringVar(&s.PassphraseFile, "passphrase-file", "", "file whose bytes are the passphrase (instead of --kms-endpoint)")
	fs.BoolVar(&s.ReadOnly, "read-only", false, "never write the image's header (no re-wrap after a rotation)")
	fs.BoolVar(&s.AllowDiscards, "allow-discards", false, "punch holes on discard; all-zero ciphertext sectors read as zeros")
	fs.BoolVar(&s.BufferedBacking, "buffered-backing", false, "open the image without O_DIRECT (for measurements)")
	fs.IntVar(&s.FUSEFD, "fuse-fd", 0, "serve the FUSE connection on this inherited descriptor instead of mounting (set by the engine host)")
	fs.StringVar(&s.Session, "session", "", "the --fuse-fd connection's negotiated parameters, JSON (set by the engine host)")
	fs.IntVar(&s.FUSEClones, "fuse-clones", 0, "descriptors after --fuse-fd that are clones of its connection (set by the engine host)")
	fs.BoolVar(&s.Resend, "resend", false, "ask the kernel to resend what a dead predecessor had read (set by the engine host)")
	fs.StringVar(&s.FUSETransport, "fuse-transport", "", "classic (default: survives through a supervisor) or io_uring (faster, no takeover; not with --fuse-fd)")
}

// Args is the argv (after the binary) that runs the engine for s: the
// "engine" command and every flag whose value differs from its default.
func (s EngineSpec) Args() []string {
	fs := flag.NewFlagSet("engine", flag.ContinueOnError)
	c := &EngineSpec{}
	c.RegisterFlags(fs) // binds the flags to c and sets c to the defaults
	*c = s
	args := []string{"engine"}
	fs.VisitAll(func(f *flag.Flag) {
		if v := f.Value.String(); v != f.DefValue {
			args = append(args, "--"+f.Name+"="+v)
		}
	})
	return args
}

// Engine is a started engine process.
type Engine struct {
	PID           int
	File          string // the plaintext FUSE file, RunDir/fuse/disk
	ControlSocket string // RunDir/control.sock
	DataOffset    int64  // bytes from the start of the image to the data segment
	SectorSize    int    // encryption sector size of the data segment
}

// FUSEDir is the FUSE mountpoint of the engine whose run dir is runDir.
func FUSEDir(runDir string) string { return filepath.Join(runDir, "fuse") }

// FileName is the name of the plaintext file inside the FUSE mount.
const FileName = "disk"

// PlainFile is the plaintext file served by the engine whose run dir is runDir.
func PlainFile(runDir string) string { return filepath.Join(runDir, "fuse", FileName) }

// ControlSocketPath is the control socket of the engine whose run dir is runDir.
func ControlSocketPath(runDir string) string { return filepath.Join(runDir, "control.sock") }

// maxSocketPath is the size of sun_path in struct sockaddr_un on Linux.
const maxSocketPath = 108

// Validate checks every field and names the first bad one.
func (s EngineSpec) Validate() error {
	switch {
	case s.VolumeID == "":
		return errors.New("engine spec: volume ID is empty")
	case s.Image == "" || !filepath.IsAbs(s.Image) && !isRBDRef(s.Image):
		return fmt.Errorf("engine spec: image %q must be an absolute path or rbd:POOL/IMAGE", s.Image)
	case s.RunDir == "" || !filepath.IsAbs(s.RunDir):
		return fmt.Errorf("engine spec: run dir %q must be an absolute path", s.RunDir)
	case len(ControlSocketPath(s.RunDir)) >= maxSocketPath:
		return fmt.Errorf("engine spec: control socket %s is longer than a unix socket path may be (%d bytes): use a shorter state directory", ControlSocketPath(s.RunDir), maxSocketPath-1)
	case s.Plaintext && (s.KMSEndpoint != "" || s.KMSID != "" || s.PassphraseFile != ""):
		return errors.New("engine spec: a plaintext volume takes no KMS endpoint, kmsID or passphrase file")
	case s.Plaintext && s.SectorSize != 512 && s.SectorSize != 4096:
		return fmt.Errorf("engine spec: --sector-size %d of a plaintext volume must be 512 or 4096", s.SectorSize)
	case !s.Plaintext && s.SectorSize != 0:
		return fmt.Errorf("engine spec: --sector-size %d is for plaintext volumes only (an encrypted volume's comes from its header)", s.SectorSize)
	case !s.Plaintext && (s.KMSEndpoint == "") == (s.PassphraseFile == ""):
		return errors.New("engine spec: give exactly one of a KMS endpoint and a passphrase file")
	case s.FUSETransport != "" && s.FUSETransport != TransportClassic && s.FUSETransport != TransportIOURing:
		return fmt.Errorf("engine spec: FUSE transport %q must be %q or %q", s.FUSETransport, TransportClassic, TransportIOURing)
	case s.FUSETransport == TransportIOURing && s.FUSEFD != 0:
		return errors.New("engine spec: the io_uring FUSE transport cannot serve a supervisor's connection (no takeover on rings)")
	case s.FUSEFD < 0 || s.FUSEFD == 1 || s.FUSEFD == 2 || s.FUSEFD == ReportFD:
		return fmt.Errorf("engine spec: --fuse-fd %d is not a descriptor an engine can be given", s.FUSEFD)
	case s.FUSEClones < 0 || s.FUSEClones > 64 || s.FUSEClones > 0 && s.FUSEFD == 0:
		return fmt.Errorf("engine spec: --fuse-clones %d needs --fuse-fd and at most 64", s.FUSEClones)
	case (s.FUSEFD == 0) != (s.Session == ""):
		return errors.New("engine spec: --fuse-fd and --session go together")
	case s.KMSTimeout < 0:
		return fmt.Errorf("engine spec: KMS timeout %s must not be negative", s.KMSTimeout)
	}
	return nil
}

func isRBDRef(s string) bool { _, ok := rbd.ParseRef(s); return ok }
