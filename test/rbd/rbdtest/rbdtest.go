//go:build ceph

// Package rbdtest helps the tests that drive csi-encdisk's RBD backend
// through CSI: a client interceptor that hands the test cluster's secrets to
// every call that carries secrets, as Kubernetes does from the
// StorageClass's secret references (never through a file).
package rbdtest

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// SecretsInterceptor fills the empty "secrets" map of every request that
// has one with secrets.
func SecretsInterceptor(secrets map[string]string) grpc.UnaryClientInterceptor {
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		if m, ok := req.(proto.Message); ok {
			fillSecrets(m.ProtoReflect(), secrets)
		}
		return invoker(ctx, method, req, reply, cc, opts...)
	}
}

func fillSecrets(m protoreflect.Message, secrets map[string]string) {
	fd := m.Descriptor().Fields().ByName("secrets")
	if fd == nil || !fd.IsMap() || fd.MapValue().Kind() != protoreflect.StringKind {
		return
	}
	if m.Has(fd) {
		return // the test set its own (e.g. bad ones on purpose)
	}
	mp := m.Mutable(fd).Map()
	for k, v := range secrets {
		mp.Set(protoreflect.ValueOfString(k).MapKey(), protoreflect.ValueOfString(v))
	}
}
