// Package kmsplugin is csi-encdisk's built-in Kubernetes KMS v2 plugin: one
// master key per region, created on the first Encrypt in that region, never
// deleted, rotated by adding versions; wrapping is AES-256-GCM with the
// key_id and region bound as associated data. Keys live in a Keystore: a
// directory of 0600 files, or a PKCS#11 token that never lets them out.
package kmsplugin

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/kms/pkg/service"
)

// APIVersion is the KMS plugin API version reported by Status.
const APIVersion = "v2"

// maxPlaintext bounds what Encrypt accepts (the KMS v2 API wraps keys).
const maxPlaintext = 4096

// Keystore holds versioned AES-256 master keys per region and seals and
// opens data with them (AES-256-GCM); keys never leave it through this API.
type Keystore interface {
	// Versions returns the region's master key versions in ascending order.
	Versions(region string) ([]int, error)
	// Create makes version v of the region's master key; it fails if that
	// version exists.
	Create(region string, v int) error
	// Seal encrypts plaintext with key (region, v), binding aad.
	Seal(region string, v int, plaintext, aad []byte) ([]byte, error)
	// Open decrypts what Seal made; any mismatch is an error.
	Open(region string, v int, ciphertext, aad []byte) ([]byte, error)
	// Close releases the keystore.
	Close() error
}

var regionRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$`)

// ValidateRegion accepts lower-case DNS-label-like region names.
func ValidateRegion(region string) error {
	if !regionRE.MatchString(region) {
		return fmt.Errorf("region %q: want 1-63 characters of a-z, 0-9, '.', '_' or '-', starting and ending alphanumeric", region)
	}
	return nil
}

// KeyID names a master key version: "<region>/v<version>".
func KeyID(region string, v int) string { return fmt.Sprintf("%s/v%d", region, v) }

// ParseKeyID splits a key_id made by KeyID.
func ParseKeyID(keyID string) (region string, v int, err error) {
	region, ver, ok := strings.Cut(keyID, "/v")
	if !ok || ValidateRegion(region) != nil {
		return "", 0, fmt.Errorf("key_id %q is not one of this plugin's (<region>/v<N>)", keyID)
	}
	v, err = strconv.Atoi(ver)
	if err != nil || v < 1 || strconv.Itoa(v) != ver {
		return "", 0, fmt.Errorf("key_id %q is not one of this plugin's (<region>/v<N>)", keyID)
	}
	return region, v, nil
}

// aad is the associated data bound to every ciphertext: the format, the
// region and the key_id, so a ciphertext opens only under its own key_id.
func aad(region, keyID string) []byte {
	return []byte("csi-encdisk-kms/1\x00" + region + "\x00" + keyID)
}

// Service implements the KMS v2 service for one region.
type Service struct {
	region string
	ks     Keystore
	mu     sync.Mutex // serialises creation of the first master key
}

var _ service.Service = (*Service)(nil)

// NewService returns the plugin service of region over ks.
func NewService(region string, ks Keystore) (*Service, error) {
	if err := ValidateRegion(region); err != nil {
		return nil, err
	}
	return &Service{region: region, ks: ks}, nil
}

// Region returns the region the service wraps keys for.
func (s *Service) Region() string { return s.region }

// current returns the newest master key version, creating version 1 when
// create is set and the region has none yet. It reads the keystore each
// time, so a rotation by another process shows at once.
func (s *Service) current(create bool) (int, error) {
	vs, err := s.ks.Versions(s.region)
	if err != nil {
		return 0, err
	}
	if len(vs) > 0 {
		return vs[len(vs)-1], nil
	}
	if !create {
		return 0, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if vs, err = s.ks.Versions(s.region); err != nil {
		return 0, err
	}
	if len(vs) > 0 {
		return vs[len(vs)-1], nil
	}
	if err := s.ks.Create(s.region, 1); err != nil {
		return 0, fmt.Errorf("create the master key of region %s: %w", s.region, err)
	}
	return 1, nil
}

// Status reports healthz "ok" when the keystore answers, and the key_id
// Encrypt uses (version 1 before the region's first Encrypt).
func (s *Service) Status(_ context.Context) (*service.StatusResponse, error) {
	v, err := s.current(false)
	if err != nil {
		return &service.StatusResponse{Version: APIVersion, Healthz: "keystore: " + err.Error(), KeyID: KeyID(s.region, 1)}, nil
	}
	if v == 0 {
		v = 1
	}
	return &service.StatusResponse{Version: APIVersion, Healthz: "ok", KeyID: KeyID(s.region, v)}, nil
}

// Encrypt wraps data under the region's newest master key.
func (s *Service) Encrypt(_ context.Context, _ string, data []byte) (*service.EncryptResponse, error) {
	if len(data) == 0 || len(data) > maxPlaintext {
		return nil, status.Errorf(codes.InvalidArgument, "plaintext of %d bytes: want 1 to %d", len(data), maxPlaintext)
	}
	v, err := s.current(true)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	keyID := KeyID(s.region, v)
	ct, err := s.ks.Seal(s.region, v, data, aad(s.region, keyID))
	if err != nil {
		return nil, status.Errorf(codes.Internal, "wrap under %s: %v", keyID, err)
	}
	return &service.EncryptResponse{Ciphertext: ct, KeyID: keyID}, nil
}

// Decrypt unwraps a ciphertext under the master key version its key_id
// names. A key_id of another region, an unknown version or a ciphertext
// that does not authenticate is refused: never wrong plaintext.
func (s *Service) Decrypt(_ context.Context, _ string, req *service.DecryptRequest) ([]byte, error) {
	region, v, err := ParseKeyID(req.KeyID)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if region != s.region {
		return nil, status.Errorf(codes.InvalidArgument, "key_id %s belongs to region %s; this plugin serves region %s", req.KeyID, region, s.region)
	}
	vs, err := s.ks.Versions(region)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if !containsInt(vs, v) {
		return nil, status.Errorf(codes.FailedPrecondition, "key_id %s: no such master key version in region %s", req.KeyID, region)
	}
	if vd, ok := s.ks.(VersionDisabler); ok {
		off, err := vd.Disabled(region, v)
		if err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
		if off {
			return nil, status.Errorf(codes.FailedPrecondition, "key_id %s is disabled (csi-encdisk kms-plugin enable-version re-enables it)", req.KeyID)
		}
	}
	pt, err := s.ks.Open(region, v, req.Ciphertext, aad(region, req.KeyID))
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "ciphertext does not authenticate under %s (tampered, or made under another key_id)", req.KeyID)
	}
	return pt, nil
}

// Rotate adds a new master key version to region and returns its key_id.
// Older versions stay: Decrypt still opens what they wrapped.
func Rotate(ks Keystore, region string) (string, error) {
	if err := ValidateRegion(region); err != nil {
		return "", err
	}
	vs, err := ks.Versions(region)
	if err != nil {
		return "", err
	}
	next := 1
	if len(vs) > 0 {
		next = vs[len(vs)-1] + 1
	}
	if err := ks.Create(region, next); err != nil {
		return "", fmt.Errorf("rotate region %s: %w", region, err)
	}
	return KeyID(region, next), nil
}

// VersionDisabler is a Keystore whose key versions can be disabled: Decrypt
// under a disabled version fails FailedPrecondition; the key stays, so it
// can be enabled again. The directory keystore is one.
type VersionDisabler interface {
	Disabled(region string, v int) (bool, error)
	SetDisabled(region string, v int, disabled bool) error
}

// SetVersionDisabled disables or re-enables master key version v of
// region. The newest version (the one Encrypt uses) cannot be disabled:
// rotate first.
func SetVersionDisabled(ks Keystore, region string, v int, disabled bool) error {
	vd, ok := ks.(VersionDisabler)
	if !ok {
		return errors.New("this keystore cannot disable key versions (the dir keystore can)")
	}
	vs, err := ks.Versions(region)
	if err != nil {
		return err
	}
	if !containsInt(vs, v) {
		return fmt.Errorf("%s: no such master key version (versions: %v)", KeyID(region, v), vs)
	}
	if disabled && v == vs[len(vs)-1] {
		return fmt.Errorf("%s is the current master key version; rotate before disabling it", KeyID(region, v))
	}
	return vd.SetDisabled(region, v, disabled)
}

func containsInt(list []int, v int) bool {
	for _, x := range list {
		if x == v {
			return true
		}
	}
	return false
}

// errNoKey is returned by keystores for a missing key version.
var errNoKey = errors.New("no such master key version")
