package fuseserve

import "encoding/binary"

// The kernel's FUSE protocol (include/uapi/linux/fuse.h), only what a
// one-file server needs. Every message is little endian on the machines we
// run on; structures are read and written in place in reused buffers.

// Opcodes.
const (
	opLookup      = 1
	opForget      = 2
	opGetattr     = 3
	opSetattr     = 4
	opOpen        = 14
	opRead        = 15
	opWrite       = 16
	opStatfs      = 17
	opRelease     = 18
	opFsync       = 20
	opFlush       = 25
	opInit        = 26
	opOpendir     = 27
	opReaddir     = 28
	opReleasedir  = 29
	opFsyncdir    = 30
	opAccess      = 34
	opInterrupt   = 36
	opDestroy     = 38
	opNotifyReply = 41
	opBatchForget = 42
	opFallocate   = 43
)

// Sizes of the fixed structures.
const (
	inHeaderSize   = 40 // fuse_in_header
	outHeaderSize  = 16 // fuse_out_header
	writeInSize    = 40 // fuse_write_in
	readInSize     = 40 // fuse_read_in
	setattrInSize  = 88 // fuse_setattr_in
	fsyncInSize    = 16 // fuse_fsync_in
	fallocInSize   = 32 // fuse_fallocate_in
	initInMinSize  = 16 // fuse_init_in before 7.36 (no flags2)
	initOutSize    = 64 // fuse_init_out since 7.23 (grown into its unused tail since)
	attrSize       = 88 // fuse_attr
	attrOutSize    = 16 + attrSize
	entryOutSize   = 40 + attrSize
	openOutSize    = 16
	writeOutSize   = 8
	statfsOutSize  = 80
	direntHdrSize  = 24 // fuse_dirent without the name
	minReadBufSize = 8192
)

// INIT flags (fuse_init_in/out flags, and flags2 as bits 32-63).
const (
	initAsyncRead      = 1 << 0
	initBigWrites      = 1 << 5
	initAsyncDIO       = 1 << 15
	initParallelDirops = 1 << 18
	initMaxPages       = 1 << 22
	initInitExt        = 1 << 30
	initHasResend      = 1 << 39
	initOverIOURing    = 1 << 41
	initRequestTimeout = 1 << 42
)

// Open reply flags.
const (
	fopenDirectIO                    = 1 << 0
	fopenParallelDirectWrites        = 1 << 6
	fattrSize                        = 1 << 3 // fuse_setattr_in.valid
	rootNodeID                       = 1
	fileNodeID                       = 2
	notifyInvalInode                 = 2
	notifyResend                     = 7
	uniqueResend              uint64 = 1 << 63 // ORed into a resent request's unique
	protoMajor                       = 7
	protoMinMinor                    = 31 // oldest protocol minor we talk
	protoMaxMinor                    = 45 // newest one whose structures we know
)

var le = binary.LittleEndian

// putOutHeader writes a fuse_out_header for a reply of total length n.
func putOutHeader(b []byte, n int, errno int32, unique uint64) {
	le.PutUint32(b[0:], uint32(n))
	le.PutUint32(b[4:], uint32(errno))
	le.PutUint64(b[8:], unique)
}

const notifyRetrieve = 5
