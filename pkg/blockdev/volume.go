package blockdev

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
	"github.com/csi-encdisk/csi-encdisk/pkg/kmsclient"
)

// DefaultOpenRunRoot holds one directory per image opened with OpenVolume.
const DefaultOpenRunRoot = "/run/csi-encdisk/open"

// OpenOptions say how OpenVolume unlocks an image and what it makes of it.
type OpenOptions struct {
	Image        string
	Passphrase   []byte // the key file's bytes; or
	KMSEndpoint  string // unix:///path of a KMS v2 plugin that unwraps the header's token
	MountDir     string // mount the filesystem found on the volume here; "" for the block device only
	RunRoot      string // DefaultOpenRunRoot if ""
	EngineBinary string // the csi-encdisk binary
	// BufferedBacking opens the image without O_DIRECT (measurements).
	BufferedBacking bool
}

// OpenState is what `volume open` leaves for `volume close` (no secrets).
type OpenState struct {
	Image    string `json:"image"`
	VolumeID string `json:"volumeID"`
	RunDir   string `json:"runDir"`
	PID      int    `json:"pid"`
	Loop     string `json:"loop"`
	Mount    string `json:"mount,omitempty"`
}

func openRunDir(runRoot, image string) (string, string, error) {
	abs, err := filepath.Abs(image)
	if err != nil {
		return "", "", err
	}
	sum := sha256.Sum256([]byte(abs))
	id := hex.EncodeToString(sum[:8])
	if runRoot == "" {
		runRoot = DefaultOpenRunRoot
	}
	return abs, filepath.Join(runRoot, id), nil
}

func statePath(runDir string) string { return filepath.Join(runDir, "state.json") }

// OpenVolume unlocks a LUKS2 aes-xts-plain64 image (made by csi-encdisk or
// cryptsetup), starts an engine for it, attaches a loop device and, if asked,
// mounts the filesystem on it. It returns the state that CloseVolume undoes.
func OpenVolume(ctx context.Context, o OpenOptions) (_ *OpenState, err error) {
	image, runDir, err := openRunDir(o.RunRoot, o.Image)
	if err != nil {
		return nil, fmt.Errorf("volume open: %w", err)
	}
	if _, err := os.Stat(statePath(runDir)); err == nil {
		return nil, fmt.Errorf("volume open: %s is already open (state %s); run 'volume close' first", image, statePath(runDir))
	}
	key, h, err := unlockImage(ctx, image, o)
	if err != nil {
		return nil, err
	}
	defer clear(key)
	if err := os.MkdirAll(runDir, 0o700); err != nil {
		return nil, fmt.Errorf("volume open: %w", err)
	}
	st := &OpenState{Image: image, VolumeID: "open-" + filepath.Base(runDir), RunDir: runDir}
	defer func() {
		if err != nil {
			if cerr := teardown(context.WithoutCancel(ctx), st); cerr != nil {
				klog.ErrorS(cerr, "Cleanup after a failed open", "image", image)
			}
		}
	}()
	spec := EngineSpec{VolumeID: st.VolumeID, Image: image, DataOffset: h.DataOffset(), SectorSize: h.SectorSize(),
		RunDir: runDir, BufferedBacking: o.BufferedBacking}
	eng, err := StartEngine(ctx, o.EngineBinary, spec, key)
	if err != nil {
		return nil, fmt.Errorf("volume open: %w", err)
	}
	st.PID = eng.PID
	if st.Loop, err = LoopAttach(ctx, eng.File, h.SectorSize(), false); err != nil {
		return nil, fmt.Errorf("volume open: %w", err)
	}
	if err := writeState(st); err != nil {
		return nil, err
	}
	if o.MountDir != "" {
		fstype, err := DetectFilesystem(ctx, st.Loop)
		if err != nil {
			return nil, fmt.Errorf("volume open: %w", err)
		}
		if fstype == "" {
			return nil, fmt.Errorf("volume open: no filesystem on %s (use --block and make one)", image)
		}
		if err := Mount(ctx, st.Loop, o.MountDir, fstype, nil); err != nil {
			return nil, fmt.Errorf("volume open: %w", err)
		}
		st.Mount, _ = filepath.Abs(o.MountDir)
		if err := writeState(st); err != nil {
			return nil, err
		}
	}
	return st, nil
}

// unlockImage reads the header and returns the volume key.
func unlockImage(ctx context.Context, image string, o OpenOptions) ([]byte, *crypt.Header, error) {
	f, err := os.Open(image)
	if err != nil {
		return nil, nil, fmt.Errorf("volume open: %w", err)
	}
	defer f.Close()
	h, err := crypt.ReadHeader(f)
	if err != nil {
		return nil, nil, fmt.Errorf("volume open %s: %w", image, err)
	}
	if h.Cipher() != "aes-xts-plain64" {
		return nil, nil, fmt.Errorf("volume open %s: cipher %q not supported (aes-xts-plain64 only)", image, h.Cipher())
	}
	pass := o.Passphrase
	if o.KMSEndpoint != "" {
		tok, ok := h.KMSToken()
		if !ok {
			return nil, nil, fmt.Errorf("volume open %s: the header has no %s token to unwrap", image, crypt.KMSTokenType)
		}
		c, err := kmsclient.New(o.KMSEndpoint, kmsclient.Options{})
		if err != nil {
			return nil, nil, fmt.Errorf("volume open %s: %w", image, err)
		}
		defer c.Close()
		pass, err = c.Decrypt(ctx, h.UUID(), &kmsclient.Wrapped{Ciphertext: tok.Ciphertext, KeyID: tok.KeyID, Annotations: tok.Annotations})
		if err != nil {
			return nil, nil, fmt.Errorf("volume open %s: unwrapping the passphrase: %w", image, err)
		}
		defer clear(pass)
	}
	if len(pass) == 0 {
		return nil, nil, errors.New("volume open: no passphrase (key file or KMS endpoint)")
	}
	key, err := h.Unlock(pass)
	if err != nil {
		return nil, nil, fmt.Errorf("volume open %s: %w", image, err)
	}
	return key, h, nil
}

func writeState(st *OpenState) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	tmp := statePath(st.RunDir) + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("volume state: %w", err)
	}
	if err := os.Rename(tmp, statePath(st.RunDir)); err != nil {
		return fmt.Errorf("volume state: %w", err)
	}
	return nil
}

// CloseVolume undoes OpenVolume for image: unmount, detach the loop device,
// stop the engine, remove the state. Safe to repeat.
func CloseVolume(ctx context.Context, image, runRoot string) error {
	abs, runDir, err := openRunDir(runRoot, image)
	if err != nil {
		return fmt.Errorf("volume close: %w", err)
	}
	b, err := os.ReadFile(statePath(runDir))
	if errors.Is(err, os.ErrNotExist) {
		if _, derr := os.Stat(runDir); derr != nil {
			return fmt.Errorf("volume close: %s is not open (no %s)", abs, runDir)
		}
		// A half-made open: clean what may be there.
		return teardown(ctx, &OpenState{Image: abs, RunDir: runDir})
	}
	if err != nil {
		return fmt.Errorf("volume close: %w", err)
	}
	var st OpenState
	if err := json.Unmarshal(b, &st); err != nil {
		return fmt.Errorf("volume close: state %s: %w", statePath(runDir), err)
	}
	return teardown(ctx, &st)
}

// teardown undoes whatever st records, in order: filesystem, loop, engine.
func teardown(ctx context.Context, st *OpenState) error {
	if st.Mount != "" {
		if err := Unmount(ctx, st.Mount); err != nil {
			return fmt.Errorf("volume close: %w", err)
		}
	}
	loop := st.Loop
	if found, err := LoopFindByFile(ctx, PlainFile(st.RunDir)); err == nil && found != "" {
		loop = found
	} else if err == nil {
		loop = ""
	}
	if loop != "" {
		dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err := LoopDetach(dctx, loop)
		cancel()
		if err != nil {
			return fmt.Errorf("volume close: %w", err)
		}
	}
	if err := UnmountEngine(ctx, st.RunDir); err != nil {
		return fmt.Errorf("volume close: %w", err)
	}
	if st.PID > 0 {
		for i := 0; i < 500 && syscall.Kill(st.PID, 0) == nil; i++ {
			time.Sleep(10 * time.Millisecond)
		}
	}
	if err := os.RemoveAll(st.RunDir); err != nil {
		return fmt.Errorf("volume close: %w", err)
	}
	return nil
}
