package driver

import (
	"context"
	"runtime/debug"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
)

// recoverPanics turns a panic in a CSI call into an Internal error for that
// call, so one bad request (a crafted image, a bug) cannot take down the
// driver and every volume operation of the node with it. The stack goes to
// the log; the request is not logged (it may carry secrets).
func recoverPanics(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
	defer func() {
		if r := recover(); r != nil {
			klog.ErrorS(nil, "Panic in CSI call", "method", info.FullMethod, "panic", r, "stack", string(debug.Stack()))
			resp, err = nil, status.Errorf(codes.Internal, "%s: internal error (the driver log has details)", info.FullMethod)
		}
	}()
	return handler(ctx, req)
}
