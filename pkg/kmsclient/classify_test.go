package kmsclient

import (
	"testing"

	"google.golang.org/grpc/codes"
)

// TestClassify: how any plugin's errors are read: unreachable backends
// (whatever code the plugin picked) and keys the KMS no longer has.
func TestClassify(t *testing.T) {
	for _, tc := range []struct {
		code              codes.Code
		msg               string
		unavailable, gone bool
	}{
		{codes.Unavailable, "connection error", true, false},
		{codes.DeadlineExceeded, "context deadline exceeded", true, false},
		{codes.Unknown, `failed to encrypt: Post "http://kms:8080/v1/keys": dial tcp 10.0.0.1:8080: connect: connection refused`, true, false},
		{codes.Unknown, "rpc error: transport is closing", true, false},
		{codes.Internal, "dial unix /run/kms/kms.sock: connect: no such file or directory", true, false},
		{codes.Unknown, "the ciphertext refers to a key that does not exist", false, true},
		{codes.NotFound, "key version 3", false, true},
		{codes.FailedPrecondition, "key_id r/v1 is disabled", false, true},
		{codes.InvalidArgument, "key_id r/v1: no such master key version in region r", false, true},
		{codes.Unknown, "failed to decrypt: cipher: message authentication failed", false, false},
		{codes.InvalidArgument, "plaintext of 0 bytes", false, false},
		{codes.Canceled, "context canceled", false, false},
	} {
		err := &Error{KMSID: "k1", Endpoint: "unix:///x.sock", Method: "Decrypt", Code: tc.code, Message: tc.msg}
		if got := IsUnavailable(err); got != tc.unavailable {
			t.Errorf("%s %q: IsUnavailable %v, want %v", tc.code, tc.msg, got, tc.unavailable)
		}
		if got := IsKeyUnusable(err); got != tc.gone {
			t.Errorf("%s %q: IsKeyUnusable %v, want %v", tc.code, tc.msg, got, tc.gone)
		}
	}
}
