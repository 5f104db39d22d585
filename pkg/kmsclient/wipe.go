package kmsclient

import (
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/grpc/experimental"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/protoadapt"
)

// KMS plaintexts (passphrases) pass through gRPC's buffers on their way to
// and from the plugin. gRPC recycles those buffers without clearing them, so
// a plaintext would linger in the process's memory long after the caller
// zeroed its own copy. These dial options keep every byte of a message in
// buffers that are cleared once gRPC is done with them:
//   - no bufio read or write buffer on the connection (frames go straight
//     between the socket and the message buffers);
//   - a buffer pool that clears a buffer when it is returned (large frames);
//   - a codec that marshals into cleared-on-free buffers and clears the
//     received frames after unmarshalling (small frames are plain slices
//     that gRPC hands to the codec and then drops).
//
// The plaintext field of a decoded DecryptResponse is a separate copy that
// Decrypt's caller owns and zeroes.
func wipingDialOptions() []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithReadBufferSize(0),
		grpc.WithWriteBufferSize(0),
		experimental.WithBufferPool(wipingPool{}),
		grpc.WithDefaultCallOptions(grpc.ForceCodecV2(wipingCodec{})),
	}
}

// wipingPool hands out fresh buffers and clears them when they come back.
// It does not reuse buffers: KMS calls are few and small.
type wipingPool struct{}

func (wipingPool) Get(length int) *[]byte {
	b := make([]byte, length)
	return &b
}

func (wipingPool) Put(b *[]byte) {
	clear((*b)[:cap(*b)])
}

// wipingCodec is gRPC's protobuf codec with buffers cleared after use.
type wipingCodec struct{}

func (wipingCodec) Name() string { return "proto" }

func (wipingCodec) Marshal(v any) (mem.BufferSlice, error) {
	m, err := protoMessage(v)
	if err != nil {
		return nil, err
	}
	size := proto.Size(m)
	buf := make([]byte, 0, size)
	buf, err = proto.MarshalOptions{UseCachedSize: true}.MarshalAppend(buf, m)
	if err != nil {
		clear(buf[:cap(buf)])
		return nil, fmt.Errorf("kms: marshal %T: %w", v, err)
	}
	return mem.BufferSlice{mem.NewBuffer(&buf, wipingPool{})}, nil
}

func (wipingCodec) Unmarshal(data mem.BufferSlice, v any) error {
	m, err := protoMessage(v)
	if err != nil {
		return err
	}
	var flat []byte
	if len(data) == 1 {
		flat = data[0].ReadOnlyData()
	} else {
		flat = data.Materialize()
		defer clear(flat)
	}
	err = proto.Unmarshal(flat, m)
	// The received bytes are gRPC's frame buffers; nothing reads them after
	// the codec, and they may hold a plaintext.
	for _, b := range data {
		clear(b.ReadOnlyData())
	}
	if err != nil {
		return fmt.Errorf("kms: unmarshal %T: %w", v, err)
	}
	return nil
}

func protoMessage(v any) (proto.Message, error) {
	switch m := v.(type) {
	case protoadapt.MessageV2:
		return m, nil
	case protoadapt.MessageV1:
		return protoadapt.MessageV2Of(m), nil
	}
	return nil, fmt.Errorf("kms: %T is not a protobuf message", v)
}
