// Package rbd is the Ceph RBD backend: a backend.Pool whose volumes and
// snapshots are RBD images (snapshots and clones are RBD copy-on-write
// clones, O(1)), and the image handles that the controller (LUKS2 headers)
// and the node's engine (the data path, through librbd) use.
//
// The librbd parts need cgo and the Ceph client libraries and are built only
// with `-tags ceph,pacific`; this file (credentials, image references) is
// always built, so that the driver and the engine starter can carry them.
//
// Credentials come from the CSI secrets of each request (keys "userID",
// "userKey", "monitors", as ceph-csi names them) and never reach a log, a
// file, argv, the environment or an error text: the engine gets them
// through an inherited pipe (SecretFD).
package rbd

import (
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"strings"
)

// Secret keys of the CSI secrets (StorageClass csi.storage.k8s.io/*-secret-name).
const (
	SecretUserID   = "userID"
	SecretUserKey  = "userKey"
	SecretMonitors = "monitors"
)

// RefPrefix starts an image reference: "rbd:POOL/IMAGE".
const RefPrefix = "rbd:"

// SecretFD is the descriptor on which an engine serving an RBD image reads
// its credentials (a pipe its starter wrote them to and closed).
const SecretFD = 4

// ErrNoCredentials: the call carried no Ceph credentials and none are cached.
var ErrNoCredentials = errors.New("no Ceph credentials: the StorageClass must name a secret with userID, userKey and monitors")

// ErrUnavailable marks a cluster that cannot be reached (or refused the
// user): the driver answers Unavailable.
var ErrUnavailable = errors.New("rbd: Ceph cluster unavailable")

// Credentials reach one Ceph cluster as one cephx user. Printing them (%v,
// %+v, %#v, %s) shows the user and monitors, never the key.
type Credentials struct {
	Monitors string `json:"monitors"`
	User     string `json:"userID"`
	Key      []byte `json:"userKey"`
}

var (
	userPattern    = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,64}$`)
	keyPattern     = regexp.MustCompile(`^[A-Za-z0-9+/]{20,200}={0,2}$`)
	monitorPattern = regexp.MustCompile(`^[\[\]A-Za-z0-9.:,/_=-]+$`)
)

// FromSecrets reads credentials from a CSI secrets map; the error names the
// missing or malformed key and what it accepts, never the value.
func FromSecrets(secrets map[string]string) (*Credentials, error) {
	c := &Credentials{Monitors: secrets[SecretMonitors], User: secrets[SecretUserID], Key: []byte(secrets[SecretUserKey])}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return c, nil
}

// Validate checks every field, naming the bad one without its value.
func (c *Credentials) Validate() error {
	switch {
	case len(c.Monitors) > 1024 || !monitorPattern.MatchString(c.Monitors):
		return fmt.Errorf("secret key %q: want the cluster's monitor addresses (host:port, comma-separated, or v2:/v1: address vectors)", SecretMonitors)
	case !userPattern.MatchString(c.User):
		return fmt.Errorf("secret key %q: want a cephx user name without the \"client.\" prefix (1-64 letters, digits, '_', '.', '-')", SecretUserID)
	case strings.HasPrefix(c.User, "client."):
		return fmt.Errorf("secret key %q: give the user without the \"client.\" prefix", SecretUserID)
	case !keyPattern.Match(c.Key) || !validCephxKey(c.Key):
		return fmt.Errorf("secret key %q: want the cephx key (base64, as `ceph auth get-key` prints it)", SecretUserKey)
	}
	return nil
}

// validCephxKey reports whether k decodes as librados will decode it (type,
// creation time, length, secret): librados logs a key it cannot decode, so
// such a key must never reach it.
func validCephxKey(k []byte) bool {
	raw := make([]byte, base64.StdEncoding.DecodedLen(len(k)))
	defer clear(raw)
	n, err := base64.StdEncoding.Decode(raw, k)
	if err != nil || n < 12 {
		return false
	}
	l := int(binary.LittleEndian.Uint16(raw[10:12]))
	return raw[0] == 1 && raw[1] == 0 && l > 0 && 12+l == n
}

// String shows who, never the key.
func (c *Credentials) String() string {
	if c == nil {
		return "<no Ceph credentials>"
	}
	return fmt.Sprintf("{user %q, monitors %q, key redacted}", c.User, c.Monitors)
}

// GoString implements fmt.GoStringer (%#v) the same way.
func (c *Credentials) GoString() string { return c.String() }

// Format makes every verb print String.
func (c *Credentials) Format(f fmt.State, _ rune) { _, _ = io.WriteString(f, c.String()) }

// Wipe zeroes the key.
func (c *Credentials) Wipe() {
	if c != nil {
		clear(c.Key)
	}
}

// AppendJSON appends c as JSON (what json.Unmarshal reads back into a
// Credentials) to a buffer of prefix, suffix and exact room, and returns
// it; the caller wipes it. json.Marshal would leave the key in its pooled
// buffers, in long-lived processes (node plugin, engine host, engine).
func (c *Credentials) AppendJSON(prefix, suffix string) ([]byte, error) {
	mon, err := json.Marshal(c.Monitors)
	if err != nil {
		return nil, err
	}
	user, err := json.Marshal(c.User)
	if err != nil {
		return nil, err
	}
	const head, mid, keyOpen, tail = `{"monitors":`, `,"userID":`, `,"userKey":"`, `"}`
	b := make([]byte, 0, len(prefix)+len(head)+len(mon)+len(mid)+len(user)+len(keyOpen)+base64.StdEncoding.EncodedLen(len(c.Key))+len(tail)+len(suffix))
	b = append(append(append(append(append(b, prefix...), head...), mon...), mid...), user...)
	b = append(base64.StdEncoding.AppendEncode(append(b, keyOpen...), c.Key), tail...)
	return append(b, suffix...), nil
}

// WriteTo writes c for ReadCredentials (JSON, AppendJSON) and closes w.
func (c *Credentials) WriteTo(w io.WriteCloser) error {
	b, err := c.AppendJSON("", "")
	if err == nil {
		_, err = w.Write(b)
	}
	clear(b)
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return errors.New("rbd: pass the credentials to the engine: write failed")
	}
	return nil
}

// ReadCredentials reads what WriteTo wrote, from the inherited SecretFD.
func ReadCredentials() (*Credentials, error) {
	f := os.NewFile(SecretFD, "credentials")
	if f == nil {
		return nil, errors.New("rbd: no credentials descriptor")
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, 1<<16))
	defer clear(b)
	if err != nil {
		return nil, fmt.Errorf("rbd: read the credentials descriptor: %w", err)
	}
	c := &Credentials{}
	if err := json.Unmarshal(b, c); err != nil {
		return nil, errors.New("rbd: the credentials descriptor holds no credentials")
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return c, nil
}

type ctxKey struct{}

// WithCredentials returns ctx carrying c (the driver puts each request's
// secrets there; the pool takes them from there).
func WithCredentials(ctx context.Context, c *Credentials) context.Context {
	return context.WithValue(ctx, ctxKey{}, c)
}

// CredentialsFrom returns the credentials ctx carries, or nil.
func CredentialsFrom(ctx context.Context) *Credentials {
	c, _ := ctx.Value(ctxKey{}).(*Credentials)
	return c
}

// Ref names an image: pool and image name.
type Ref struct {
	Pool, Image string
}

func (r Ref) String() string { return RefPrefix + r.Pool + "/" + r.Image }

var namePattern = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,128}$`)

// ParseRef parses "rbd:POOL/IMAGE".
func ParseRef(s string) (Ref, bool) {
	rest, ok := strings.CutPrefix(s, RefPrefix)
	if !ok {
		return Ref{}, false
	}
	pool, img, ok := strings.Cut(rest, "/")
	if !ok || !namePattern.MatchString(pool) || !namePattern.MatchString(img) {
		return Ref{}, false
	}
	return Ref{Pool: pool, Image: img}, true
}

// ValidPoolName reports whether name can be a pool (StorageClass "pool").
func ValidPoolName(name string) bool { return namePattern.MatchString(name) }
