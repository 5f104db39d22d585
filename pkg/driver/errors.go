package driver

import (
	"context"
	"errors"
	"fmt"
	"syscall"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-encdisk/csi-encdisk/pkg/backend"
)

// errKMSUnavailable marks a KMS plugin that cannot be reached (or did not
// answer in time); it maps to codes.Unavailable.
var errKMSUnavailable = errors.New("KMS plugin unavailable")

// errKMSKeyUnusable marks a key_id (master key version) that the KMS no
// longer has or allows; it maps to codes.FailedPrecondition.
var errKMSKeyUnusable = errors.New("KMS key unusable")

// errKMSTokenTooLarge marks a KMS answer too large for the LUKS2 token
// (beyond the KMS v2 API's limits); it maps to codes.FailedPrecondition.
var errKMSTokenTooLarge = errors.New("KMS answer too large for the LUKS2 token")

// errUnknownKMS marks a kmsID that no configured plugin has; it maps to
// codes.InvalidArgument.
var errUnknownKMS = errors.New("unknown kmsID")

// toStatus turns an error of the backend or the KMS into a gRPC status with
// the right code; what says which operation failed. Errors that already are
// statuses pass through. No error text here carries key material: the
// packages below never put it into their errors.
func toStatus(err error, what string) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	code := codes.Internal
	switch {
	case errors.Is(err, backend.ErrNotFound):
		code = codes.NotFound
	case errors.Is(err, backend.ErrCorrupt):
		code = codes.DataLoss
	case errors.Is(err, errKMSUnavailable):
		code = codes.Unavailable
	case errors.Is(err, errKMSKeyUnusable), errors.Is(err, errKMSTokenTooLarge):
		code = codes.FailedPrecondition
	case errors.Is(err, errUnknownKMS):
		code = codes.InvalidArgument
	case errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT):
		code = codes.ResourceExhausted
	case errors.Is(err, syscall.EFBIG):
		code = codes.OutOfRange // the pool's filesystem cannot hold a file that large
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	}
	return status.Error(code, fmt.Sprintf("%s: %v", what, err))
}

// invalid is an InvalidArgument status.
func invalid(format string, args ...any) error {
	return status.Errorf(codes.InvalidArgument, format, args...)
}
