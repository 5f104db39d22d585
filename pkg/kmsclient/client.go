// Package kmsclient is the driver's only way to a KMS: a client of the
// Kubernetes KMS v2 plugin API (k8s.io/kms/apis/v2: Status, Encrypt,
// Decrypt) over a unix socket, with per-call deadlines, bounded retries,
// errors that name the endpoint and never carry plaintext, and Prometheus
// metrics by CSI operation (the cost a KMS quota counts).
package kmsclient

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"
)

// DefaultTimeout bounds one call (retries included) when none is configured.
const DefaultTimeout = 10 * time.Second

// Wrapped is what Encrypt returns and Decrypt needs back: the ciphertext,
// the key_id of the master key that made it, and the plugin's annotations.
type Wrapped struct {
	Ciphertext  []byte
	KeyID       string
	Annotations map[string][]byte
}

// Status is the plugin's health: healthz "ok", API version, current key_id.
type Status struct {
	Healthz string
	Version string
	KeyID   string
}

// Options configure a Client.
type Options struct {
	// Timeout bounds each call, retries included (DefaultTimeout if 0).
	Timeout time.Duration
	// Metrics receives call counts and latencies (nil: none).
	Metrics *Metrics
	// KMSID names the configured entry, for metrics and messages.
	KMSID string
	// OnCall, when set, is told the method and outcome of every call (the
	// engine counts its calls this way and reports them to the node).
	OnCall func(method string, err error)
}

// Client talks to one KMS v2 plugin.
type Client struct {
	endpoint string
	kmsID    string
	timeout  time.Duration
	metrics  *Metrics
	onCall   func(method string, err error)
	conn     *grpc.ClientConn
	api      kmsapi.KeyManagementServiceClient
}

// New returns a client for endpoint ("unix:///path/to/socket"). It does not
// connect yet: the first call does, and calls reconnect after the plugin
// restarts.
func New(endpoint string, opts Options) (*Client, error) {
	if err := ValidateEndpoint(endpoint); err != nil {
		return nil, err
	}
	timeout := opts.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	dialOpts := append(wipingDialOptions(),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		// gRPC's default reconnect backoff grows to 2 minutes: after an
		// outage the restarted plugin would stay unreached that long. A
		// local socket is cheap to retry, so cap the backoff at a second.
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
			MinConnectTimeout: time.Second,
		}))
	conn, err := grpc.NewClient(endpoint, dialOpts...)
	if err != nil {
		return nil, fmt.Errorf("kms %s: %w", endpoint, err)
	}
	return &Client{
		endpoint: endpoint,
		kmsID:    opts.KMSID,
		timeout:  timeout,
		metrics:  opts.Metrics,
		onCall:   opts.OnCall,
		conn:     conn,
		api:      kmsapi.NewKeyManagementServiceClient(conn),
	}, nil
}

// ValidateEndpoint accepts only unix socket endpoints with an absolute path.
func ValidateEndpoint(endpoint string) error {
	path, ok := strings.CutPrefix(endpoint, "unix://")
	if !ok || !strings.HasPrefix(path, "/") {
		return fmt.Errorf("kms endpoint %q: want unix:///absolute/path/to/socket", endpoint)
	}
	return nil
}

// Endpoint returns the plugin's endpoint.
func (c *Client) Endpoint() string { return c.endpoint }

// Close releases the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Status asks the plugin for its health and current key_id.
func (c *Client) Status(ctx context.Context) (*Status, error) {
	var resp *kmsapi.StatusResponse
	err := c.call(ctx, "Status", func(ctx context.Context) (err error) {
		resp, err = c.api.Status(ctx, &kmsapi.StatusRequest{})
		return err
	})
	if err != nil {
		return nil, err
	}
	return &Status{Healthz: resp.GetHealthz(), Version: resp.GetVersion(), KeyID: resp.GetKeyId()}, nil
}

// Encrypt wraps plaintext under the plugin's current master key. uid is a
// request id for tracing.
func (c *Client) Encrypt(ctx context.Context, uid string, plaintext []byte) (*Wrapped, error) {
	var resp *kmsapi.EncryptResponse
	err := c.call(ctx, "Encrypt", func(ctx context.Context) (err error) {
		resp, err = c.api.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: plaintext, Uid: uid})
		return err
	})
	if err != nil {
		return nil, err
	}
	if len(resp.GetCiphertext()) == 0 || resp.GetKeyId() == "" {
		return nil, fmt.Errorf("kms %s: Encrypt returned an empty ciphertext or key_id", c.endpoint)
	}
	return &Wrapped{Ciphertext: resp.GetCiphertext(), KeyID: resp.GetKeyId(), Annotations: resp.GetAnnotations()}, nil
}

// Decrypt unwraps w, sending back the key_id and annotations Encrypt gave.
// The caller owns (and should zero) the plaintext.
func (c *Client) Decrypt(ctx context.Context, uid string, w *Wrapped) ([]byte, error) {
	if w == nil || len(w.Ciphertext) == 0 {
		return nil, fmt.Errorf("kms %s: Decrypt: empty ciphertext", c.endpoint)
	}
	var resp *kmsapi.DecryptResponse
	err := c.call(ctx, "Decrypt", func(ctx context.Context) (err error) {
		resp, err = c.api.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: w.Ciphertext, Uid: uid, KeyId: w.KeyID, Annotations: w.Annotations})
		return err
	})
	if err != nil {
		return nil, err
	}
	return resp.GetPlaintext(), nil
}

// call runs fn under the client's deadline, retrying with exponential
// backoff while the plugin is unavailable, and records metrics. Errors keep
// the gRPC code, name the endpoint and carry only the plugin's status
// message (never request data).
func (c *Client) call(ctx context.Context, method string, fn func(ctx context.Context) error) error {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	backoff := 50 * time.Millisecond
	var err error
	for attempt := 1; ; attempt++ {
		err = fn(ctx)
		if err == nil || !retryable(err) {
			break
		}
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
			backoff = min(2*backoff, time.Second)
			continue
		}
		break
	}
	c.metrics.observe(c.kmsID, method, operation(ctx), err, time.Since(start))
	if c.onCall != nil {
		c.onCall(method, err)
	}
	if err == nil {
		return nil
	}
	st, _ := status.FromError(err)
	code := st.Code()
	switch {
	case errors.Is(ctx.Err(), context.Canceled):
		code = codes.Canceled
	case ctx.Err() != nil && code != codes.Unavailable:
		code = codes.DeadlineExceeded
	}
	return &Error{KMSID: c.kmsID, Endpoint: c.endpoint, Method: method, Code: code, Message: st.Message()}
}

func retryable(err error) bool {
	switch status.Code(err) {
	case codes.Unavailable, codes.DeadlineExceeded:
		return true
	}
	return false
}

// Error is a failed KMS call.
type Error struct {
	KMSID    string
	Endpoint string
	Method   string
	Code     codes.Code
	Message  string
}

func (e *Error) Error() string {
	id := e.KMSID
	if id == "" {
		id = DefaultID
	}
	if IsUnavailable(e) {
		return fmt.Sprintf("kms %q: plugin at %s unreachable (%s %s): %s", id, e.Endpoint, e.Method, e.Code, e.Message)
	}
	return fmt.Sprintf("kms %q: plugin at %s: %s failed (%s): %s", id, e.Endpoint, e.Method, e.Code, e.Message)
}

// GRPCStatus lets status.FromError see the KMS call's code.
func (e *Error) GRPCStatus() *status.Status { return status.New(e.Code, e.Error()) }

// connectionFailures are texts by which plugins that answer gRPC Unknown
// (or Internal) say that their own backend, or the socket, could not be
// reached: a cloud KMS plugin whose KMS is down, a plugin whose emulator
// refuses connections.
var connectionFailures = []string{
	"connection refused", "no such file", "transport", "connection reset", "broken pipe",
	"dial ", "i/o timeout", "no route to host", "network is unreachable", "host is down",
	"timed out", "timeout", "unavailable", "eof",
}

// keyGone are texts by which plugins say that a key_id (a master key
// version) no longer exists or may no longer be used.
var keyGone = []string{
	"does not exist", "not found", "no such master key", "no such key", "disabled", "destroyed",
	"scheduled for deletion", "pending deletion", "key_id is not", "unknown key",
}

func containsAny(msg string, list []string) bool {
	msg = strings.ToLower(msg)
	for _, s := range list {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}

// IsUnavailable reports whether err means the plugin, or the KMS behind it,
// could not be reached in time: codes Unavailable and DeadlineExceeded, and
// Unknown or Internal whose message carries a connection failure ("connection
// refused", "no such file", "transport ..."). The driver answers Unavailable
// then, and the caller should retry.
func IsUnavailable(err error) bool {
	var e *Error
	if !errors.As(err, &e) {
		return false
	}
	switch e.Code {
	case codes.Unavailable, codes.DeadlineExceeded:
		return true
	case codes.Unknown, codes.Internal:
		return containsAny(e.Message, connectionFailures) && !containsAny(e.Message, keyGone)
	}
	return false
}

// IsKeyUnusable reports whether err means the KMS no longer knows, or no
// longer lets anyone use, the key_id it was asked about (a deleted or
// disabled master key version): codes NotFound and FailedPrecondition, and
// any other code but Unavailable whose message says so. Retrying does not
// help; the driver answers FailedPrecondition naming the key_id.
func IsKeyUnusable(err error) bool {
	var e *Error
	if !errors.As(err, &e) || IsUnavailable(err) {
		return false
	}
	switch e.Code {
	case codes.NotFound, codes.FailedPrecondition:
		return true
	case codes.Canceled, codes.ResourceExhausted, codes.Unauthenticated:
		return false
	}
	return containsAny(e.Message, keyGone)
}

type operationKey struct{}

// WithOperation names the CSI operation (CreateVolume, NodeStageVolume, ...)
// that KMS calls made with ctx are counted under.
func WithOperation(ctx context.Context, op string) context.Context {
	return context.WithValue(ctx, operationKey{}, op)
}

func operation(ctx context.Context) string {
	if op, ok := ctx.Value(operationKey{}).(string); ok && op != "" {
		return op
	}
	return "other"
}

// Timeout is the bound of one call, retries included.
func (c *Client) Timeout() time.Duration { return c.timeout }

// KMSID is the configured id of the plugin this client talks to.
func (c *Client) KMSID() string { return c.kmsID }

// CountCalls adds n calls to this client's metrics that another process made
// to the same plugin on this client's behalf: a volume's engine unwraps its
// passphrase itself (so the node never holds it) and reports its calls.
// result is the gRPC code name ("OK", "Unavailable", ...).
func (c *Client) CountCalls(method, op, result string, n int) {
	c.metrics.add(c.kmsID, method, op, result, n)
}
