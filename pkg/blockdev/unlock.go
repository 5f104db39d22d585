package blockdev

import (
	"github.com/csi-encdisk/csi-encdisk/pkg/imagelock"

	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
	"github.com/csi-encdisk/csi-encdisk/pkg/kmsclient"
)

// Why an engine could not unlock its image. StartEngine returns errors that
// wrap one of these, so that the node can answer with the right CSI code.
var (
	// ErrBadHeader: the image has no usable LUKS2 header, an unsupported
	// cipher, or no csi-encdisk-kms token for the configured KMS.
	ErrBadHeader = errors.New("image header unusable")
	// ErrKMSUnavailable: the KMS plugin could not be reached in time.
	ErrKMSUnavailable = errors.New("KMS plugin unavailable")
	// ErrKMSRefused: the KMS plugin answered but would not unwrap the token.
	ErrKMSRefused = errors.New("KMS plugin refused to unwrap the passphrase")
	// ErrWrongPassphrase: the passphrase opens no keyslot of the image.
	ErrWrongPassphrase = errors.New("passphrase opens no keyslot")
	// ErrInUse: another engine or node holds the image's writer lock.
	ErrInUse = imagelock.ErrInUse
	// ErrEncryptionMismatch: the engine was asked to serve an encrypted
	// volume and the image's record says unencrypted, or the reverse
	// (EngineSpec.Plaintext). Nothing is served.
	ErrEncryptionMismatch = errors.New("the image's encryption differs from what the volume context says")
)

// kmsCallCounter counts an engine's KMS calls by method and result, for the
// start report (the engine has no metrics endpoint; the node adds these to
// its own KMS metrics).
type kmsCallCounter struct {
	mu    sync.Mutex
	calls map[KMSCall]int
}

func (c *kmsCallCounter) observe(method string, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.calls == nil {
		c.calls = map[KMSCall]int{}
	}
	c.calls[KMSCall{Method: method, Result: status.Code(err).String()}]++
}

func (c *kmsCallCounter) report() []KMSCall {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]KMSCall, 0, len(c.calls))
	for k, n := range c.calls {
		k.N = n
		out = append(out, k)
	}
	return out
}

// unlockImage reads the image's LUKS2 header, gets the passphrase (from the
// KMS or the passphrase file), re-wraps it after a master key rotation
// unless the spec is read-only, opens the keyslot and returns the data
// segment's XTS cipher. The passphrase and the volume key are wiped before
// it returns: afterwards the key exists only as the cipher's key schedule.
func unlockImage(ctx context.Context, spec EngineSpec, image crypt.Image, calls *kmsCallCounter) (*crypt.XTS, *crypt.Header, error) {
	h, err := crypt.ReadHeader(image)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %s: %w", ErrBadHeader, spec.Image, err)
	}
	if c := h.Cipher(); c != "aes-xts-plain64" {
		return nil, nil, fmt.Errorf("%w: %s uses cipher %s; only aes-xts-plain64 is supported", ErrBadHeader, spec.Image, c)
	}
	var pass []byte
	if spec.PassphraseFile != "" {
		pass, err = crypt.ReadKeyFile(spec.PassphraseFile)
		if err != nil {
			return nil, nil, err
		}
	} else {
		pass, err = unwrapPassphrase(ctx, spec, h, image, calls)
		if err != nil {
			return nil, nil, err
		}
	}
	lock(pass)
	vk, err := h.Unlock(pass)
	wipe(pass)
	if errors.Is(err, crypt.ErrWrongPassphrase) {
		return nil, nil, fmt.Errorf("%w of %s", ErrWrongPassphrase, spec.Image)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("unlock %s: %w", spec.Image, err)
	}
	lock(vk)
	defer wipe(vk)
	x, err := crypt.NewXTS(vk, h.SectorSize())
	if err != nil {
		return nil, nil, fmt.Errorf("volume key of %s: %w", spec.Image, err)
	}
	return x, h, nil
}

// unwrapPassphrase asks the KMS plugin to unwrap the header's token and,
// when the plugin's current master key is another than the token's (a
// rotation) and the spec allows writing, wraps the passphrase again and
// replaces the token (header update only; the data is not touched).
func unwrapPassphrase(ctx context.Context, spec EngineSpec, h *crypt.Header, image crypt.Image, calls *kmsCallCounter) ([]byte, error) {
	tok, ok := h.KMSToken()
	if !ok {
		return nil, fmt.Errorf("%w: %s has no %s token", ErrBadHeader, spec.Image, crypt.KMSTokenType)
	}
	if want, got := orDefault(spec.KMSID), orDefault(tok.KMSID); want != got {
		return nil, fmt.Errorf("%w: %s is wrapped by KMS %q, not %q", ErrBadHeader, spec.Image, got, want)
	}
	client, err := kmsclient.New(spec.KMSEndpoint, kmsclient.Options{Timeout: spec.KMSTimeout, KMSID: tok.KMSID, OnCall: calls.observe})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrKMSUnavailable, err)
	}
	defer client.Close()
	pass, err := client.Decrypt(ctx, requestUID(), &kmsclient.Wrapped{Ciphertext: tok.Ciphertext, KeyID: tok.KeyID, Annotations: tok.Annotations})
	if err != nil {
		if kmsclient.IsUnavailable(err) {
			return nil, fmt.Errorf("%w: %w", ErrKMSUnavailable, err)
		}
		return nil, fmt.Errorf("%w: %w", ErrKMSRefused, err)
	}
	lock(pass)
	if spec.ReadOnly {
		klog.V(2).InfoS("Read-only engine: token not re-wrapped", "volumeID", spec.VolumeID)
		return pass, nil
	}
	if err := rewrapIfRotated(ctx, client, image, tok, pass); err != nil {
		// The old master key version still unwraps: serve the volume, and
		// say why the token stays where it is (the next stage retries).
		klog.ErrorS(err, "Passphrase not re-wrapped under the current master key", "volumeID", spec.VolumeID, "keyID", tok.KeyID)
	}
	return pass, nil
}

// rewrapIfRotated wraps pass under the plugin's current master key and
// replaces the token when the plugin reports another key_id than the
// token's. It returns why it could not, or nil when nothing was needed or
// the token was replaced.
func rewrapIfRotated(ctx context.Context, client *kmsclient.Client, image crypt.Image, tok *crypt.KMSToken, pass []byte) error {
	st, err := client.Status(ctx)
	switch {
	case err != nil:
		return fmt.Errorf("KMS status: %w", err)
	case st.KeyID == "" || st.KeyID == tok.KeyID:
		return nil
	case st.Healthz != "ok":
		return fmt.Errorf("KMS reports key_id %q but healthz %q; re-wrap postponed", st.KeyID, st.Healthz)
	}
	w, err := client.Encrypt(ctx, requestUID(), pass)
	if err != nil {
		return fmt.Errorf("wrap under key_id %q: %w", st.KeyID, err)
	}
	nt := &crypt.KMSToken{KMSID: tok.KMSID, KeyID: w.KeyID, Ciphertext: w.Ciphertext, Annotations: w.Annotations}
	if err := crypt.SetKMSToken(image, nt); err != nil {
		return fmt.Errorf("write the new token: %w", err)
	}
	klog.InfoS("Passphrase re-wrapped under the current master key", "oldKeyID", tok.KeyID, "newKeyID", w.KeyID)
	return nil
}

func orDefault(kmsID string) string {
	if kmsID == "" {
		return kmsclient.DefaultID
	}
	return kmsID
}

// requestUID makes the per-request UID the KMS v2 API asks for.
func requestUID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// lock keeps a secret out of swap (the engine also mlockalls; this covers a
// refused mlockall). wipe zeroes it and undoes lock.
func lock(b []byte) {
	if len(b) > 0 {
		_ = unix.Mlock(b)
	}
}

func wipe(b []byte) {
	clear(b)
	if len(b) > 0 {
		_ = unix.Munlock(b)
	}
}
