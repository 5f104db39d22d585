package driver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
	"github.com/csi-encdisk/csi-encdisk/pkg/kmsclient"
	"github.com/csi-encdisk/csi-encdisk/pkg/kmsplugin"
)

// kmsWrapper is the part of one KMS plugin's client the controller uses:
// wrap a new volume's passphrase, check that a stored one still unwraps,
// re-wrap after a rotation, and report the plugin's health and key_id.
type kmsWrapper interface {
	// KMSID is the configured id of the plugin.
	KMSID() string
	// Endpoint names the plugin in errors.
	Endpoint() string
	// Status returns the plugin's health and current key_id; errors are
	// mapped as Wrap's.
	Status(ctx context.Context) (*kmsclient.Status, error)
	// Wrap encrypts a passphrase and returns the token to store in the
	// volume's LUKS2 header. Errors wrap errKMSUnavailable when the plugin
	// cannot be reached, and never contain the plaintext.
	Wrap(ctx context.Context, uid string, passphrase []byte) (*crypt.KMSToken, error)
	// Unwrap decrypts a token's passphrase; the caller zeroes it. Errors
	// wrap errKMSUnavailable, or errKMSKeyUnusable naming the token's
	// key_id when the KMS no longer has or allows that key.
	Unwrap(ctx context.Context, uid string, tok *crypt.KMSToken) ([]byte, error)
}

// kmsSet resolves a StorageClass's kmsID to its plugin.
type kmsSet interface {
	// Get returns the plugin of kmsID ("" is "default"); an unknown ID gives
	// an error wrapping errUnknownKMS that names the known IDs.
	Get(kmsID string) (kmsWrapper, error)
	// IDs lists the configured kmsIDs.
	IDs() []string
}

// registrySet is a kmsSet on a kmsclient.Registry.
type registrySet struct{ r *kmsclient.Registry }

// Get implements kmsSet.
func (s registrySet) Get(kmsID string) (kmsWrapper, error) {
	if kmsID == "" {
		kmsID = kmsclient.DefaultID
	}
	c, err := s.r.Get(kmsID)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", errUnknownKMS, err)
	}
	return clientWrapper{c: c, id: kmsID}, nil
}

// IDs implements kmsSet.
func (s registrySet) IDs() []string { return s.r.IDs() }

// clientWrapper adapts a kmsclient.Client. Its errors keep the client's
// text (which names the kmsID, the endpoint and the plugin's cause) but not
// its gRPC code: the driver picks the code (Unavailable for an unreachable
// plugin or KMS, FailedPrecondition for a key the KMS no longer has,
// Internal otherwise).
type clientWrapper struct {
	c  *kmsclient.Client
	id string
}

// KMSID implements kmsWrapper.
func (w clientWrapper) KMSID() string { return w.id }

// Endpoint implements kmsWrapper.
func (w clientWrapper) Endpoint() string { return w.c.Endpoint() }

// kmsError keeps the text of a KMS client error and marks an unreachable
// plugin with errKMSUnavailable, and a key_id the KMS no longer knows (when
// the call named one) with errKMSKeyUnusable.
func kmsError(err error, keyID string) error {
	switch {
	case kmsclient.IsUnavailable(err):
		return fmt.Errorf("%w: %v", errKMSUnavailable, err)
	case keyID != "" && kmsclient.IsKeyUnusable(err):
		return fmt.Errorf("%w: key_id %q can no longer be used: %v", errKMSKeyUnusable, keyID, err)
	}
	return errors.New(err.Error())
}

// Status implements kmsWrapper.
func (w clientWrapper) Status(ctx context.Context) (*kmsclient.Status, error) {
	st, err := w.c.Status(ctx)
	if err != nil {
		return nil, kmsError(err, "")
	}
	return st, nil
}

// Wrap implements kmsWrapper with the plugin's Encrypt.
func (w clientWrapper) Wrap(ctx context.Context, uid string, passphrase []byte) (*crypt.KMSToken, error) {
	wr, err := w.c.Encrypt(ctx, uid, passphrase)
	if err != nil {
		return nil, kmsError(err, "")
	}
	tok := &crypt.KMSToken{KMSID: w.id, KeyID: wr.KeyID, Ciphertext: wr.Ciphertext, Annotations: wr.Annotations}
	if err := checkTokenSize(tok); err != nil {
		return nil, fmt.Errorf("kms %q: plugin at %s: Encrypt: %w", w.id, w.c.Endpoint(), err)
	}
	return tok, nil
}

// checkTokenSize refuses an Encrypt answer beyond the KMS v2 API's limits,
// which the LUKS2 metadata of new images (crypt.KMSHeaderSize) is sized
// for; it wraps errKMSTokenTooLarge.
func checkTokenSize(t *crypt.KMSToken) error {
	ann := 0
	for k, v := range t.Annotations {
		ann += len(k) + len(v)
	}
	switch {
	case len(t.Ciphertext) > crypt.MaxKMSCiphertext:
		return fmt.Errorf("%w: ciphertext of %d bytes, more than the %d bytes the KMS v2 API allows", errKMSTokenTooLarge, len(t.Ciphertext), crypt.MaxKMSCiphertext)
	case len(t.KeyID) > crypt.MaxKMSKeyID:
		return fmt.Errorf("%w: key_id of %d bytes, more than the %d bytes the KMS v2 API allows", errKMSTokenTooLarge, len(t.KeyID), crypt.MaxKMSKeyID)
	case ann > crypt.MaxKMSAnnotations:
		return fmt.Errorf("%w: annotations of %d bytes (keys and values), more than the %d bytes the KMS v2 API allows", errKMSTokenTooLarge, ann, crypt.MaxKMSAnnotations)
	}
	return nil
}

// Unwrap implements kmsWrapper with the plugin's Decrypt.
func (w clientWrapper) Unwrap(ctx context.Context, uid string, tok *crypt.KMSToken) ([]byte, error) {
	pt, err := w.c.Decrypt(ctx, uid, &kmsclient.Wrapped{Ciphertext: tok.Ciphertext, KeyID: tok.KeyID, Annotations: tok.Annotations})
	if err != nil {
		return nil, kmsError(err, tok.KeyID)
	}
	return pt, nil
}

// kmsSetup is the driver's KMS wiring: the set the controller uses, the
// registry the node uses, and what to close at the end.
type kmsSetup struct {
	set      kmsSet
	registry *kmsclient.Registry
	describe string
	closers  []func() error
}

func (k *kmsSetup) close() {
	for i := len(k.closers) - 1; i >= 0; i-- {
		if err := k.closers[i](); err != nil {
			klog.ErrorS(err, "Closing KMS")
		}
	}
	k.closers = nil
}

// embeddedRegion is the built-in plugin's region when the driver has none.
const embeddedRegion = "default"

// setupKMS builds the registry of cfg: from a config file, from one
// endpoint, or, with neither, on the built-in plugin started in-process on
// unix://DataDir/kms/kms.sock (or already served there by another driver
// process sharing the data directory).
func setupKMS(ctx context.Context, cfg Config, reg prometheus.Registerer) (*kmsSetup, error) {
	ks := &kmsSetup{}
	var kcfg *kmsclient.Config
	switch {
	case cfg.KMSConfigFile != "":
		c, err := kmsclient.LoadConfig(cfg.KMSConfigFile)
		if err != nil {
			return nil, err
		}
		kcfg, ks.describe = c, "config "+cfg.KMSConfigFile
	case cfg.KMSEndpoint != "":
		kcfg, ks.describe = kmsclient.SingleEndpoint(cfg.KMSEndpoint, cfg.KMSTimeout), cfg.KMSEndpoint
	default:
		endpoint, stop, err := startEmbeddedKMS(ctx, cfg)
		if err != nil {
			return nil, err
		}
		if stop != nil {
			ks.closers = append(ks.closers, stop)
		}
		kcfg, ks.describe = kmsclient.SingleEndpoint(endpoint, cfg.KMSTimeout), "built-in "+endpoint
	}
	r, err := kmsclient.NewRegistry(kcfg, kmsclient.Options{Timeout: cfg.KMSTimeout, Metrics: kmsclient.NewMetrics(reg)})
	if err != nil {
		ks.close()
		return nil, err
	}
	ks.registry, ks.set = r, registrySet{r}
	ks.closers = append(ks.closers, r.Close)
	return ks, nil
}

// startEmbeddedKMS runs the built-in plugin on DataDir/kms. It returns a
// nil stop function when a live plugin already serves that socket.
func startEmbeddedKMS(ctx context.Context, cfg Config) (string, func() error, error) {
	dir, err := filepath.Abs(filepath.Join(cfg.DataDir, "kms"))
	if err != nil {
		return "", nil, fmt.Errorf("built-in KMS: %w", err)
	}
	sock := filepath.Join(dir, "kms.sock")
	endpoint := "unix://" + sock
	if c, err := net.DialTimeout("unix", sock, time.Second); err == nil {
		c.Close()
		klog.FromContext(ctx).Info("Using the built-in KMS plugin another process serves", "endpoint", endpoint)
		return endpoint, nil, nil
	}
	keys := filepath.Join(dir, "keys")
	if err := os.MkdirAll(keys, 0o700); err != nil {
		return "", nil, fmt.Errorf("built-in KMS: %w", err)
	}
	store, err := kmsplugin.InitKeystore("dir:" + keys) // the driver's own directory
	if err != nil {
		return "", nil, fmt.Errorf("built-in KMS: %w", err)
	}
	region := cfg.Region
	if region == "" {
		region = embeddedRegion
	}
	svc, err := kmsplugin.NewService(region, store)
	if err != nil {
		store.Close()
		return "", nil, fmt.Errorf("built-in KMS: %w", err)
	}
	sctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- kmsplugin.ServeNotify(sctx, endpoint, svc, ready) }()
	select {
	case <-ready:
	case err := <-done:
		cancel()
		store.Close()
		return "", nil, fmt.Errorf("built-in KMS: %w", err)
	}
	stop := func() error {
		cancel()
		err := <-done
		return errors.Join(err, store.Close())
	}
	return endpoint, stop, nil
}
