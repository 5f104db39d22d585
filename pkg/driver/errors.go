package driver

import (
	"context"
	"errors"
	"fmt"
	"syscall"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-encdisk/csi-encdisk/pkg/backend"
	"github.com/csi-encdisk/csi-encdisk/pkg/keyedlock"
	"github.com/csi-encdisk/csi-encdisk/pkg/rbd"
	"github.com/csi-encdisk/csi-encdisk/pkg/staging"
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

// statusCodes maps the sentinel errors of the packages below to the one
// CSI code each event gets, on every service.
var statusCodes = []struct {
	err  error
	code codes.Code
}{
	{keyedlock.ErrBusy, codes.Aborted},
	{rbd.ErrNoCredentials, codes.InvalidArgument}, // before ErrUnavailable, which may wrap it
	{rbd.ErrUnavailable, codes.Unavailable},
	{errNoCephBuild, codes.InvalidArgument},
	{backend.ErrNotFound, codes.NotFound},
	{backend.ErrCorrupt, codes.DataLoss},
	{errKMSKeyUnusable, codes.FailedPrecondition},
	{errKMSTokenTooLarge, codes.FailedPrecondition},
	{errKMSUnavailable, codes.Unavailable},
	{errUnknownKMS, codes.InvalidArgument},
	{staging.ErrReservedPath, codes.InvalidArgument},
	{staging.ErrAccessMismatch, codes.InvalidArgument},
	{staging.ErrIncompatible, codes.AlreadyExists},
	{staging.ErrEncryptionMismatch, codes.FailedPrecondition},
	{staging.ErrStagedElsewhere, codes.FailedPrecondition},
	{staging.ErrStillPublished, codes.FailedPrecondition},
	{staging.ErrNotStaged, codes.FailedPrecondition},
	{staging.ErrNoFilesystem, codes.FailedPrecondition},
	{staging.ErrFilesystemMismatch, codes.FailedPrecondition},
	{staging.ErrTargetBusy, codes.FailedPrecondition},
	{staging.ErrNoKMS, codes.FailedPrecondition},
	{staging.ErrImageTooSmall, codes.FailedPrecondition},
	{staging.ErrBadHeader, codes.FailedPrecondition},
	{staging.ErrWrongPassphrase, codes.FailedPrecondition},
	{staging.ErrKMSRefused, codes.FailedPrecondition},
	{staging.ErrKMSUnavailable, codes.Unavailable},
	{staging.ErrInUse, codes.FailedPrecondition}, // = backend.ErrInUse = imagelock.ErrInUse
}

// toStatus turns an error of the packages below into a gRPC status with the
// right code; what says which operation or volume failed. Errors that
// already are statuses pass through. No error text here carries key
// material: the packages below never put it into their errors.
func toStatus(err error, what string) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	code := codes.Internal
	for _, c := range statusCodes {
		if errors.Is(err, c.err) {
			return status.Error(c.code, fmt.Sprintf("%s: %v", what, err))
		}
	}
	switch {
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
