package fuseserve

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// FileName is the name of the one file in the mount's root directory.
const FileName = "disk"

// File is what the server serves. Calls come concurrently from several
// readers. Offsets and lengths are whatever the kernel sends: with a loop
// device of 4096-byte sectors on top they are 4096-aligned. p is only valid
// during the call; it is page-aligned (usable for O_DIRECT I/O).
type File interface {
	// ReadAt fills p from off; the server never asks beyond Size. A short
	// count without an error ends the read there.
	ReadAt(p []byte, off int64) (int, syscall.Errno)
	// WriteAt writes p at off; the server refuses writes beyond Size with
	// ENOSPC itself. A write may be delivered twice after a takeover (see the
	// package documentation): it must not depend on what the sectors held.
	WriteAt(p []byte, off int64) (int, syscall.Errno)
	// Size is the file size (sampled on every GETATTR, LOOKUP, READ, WRITE).
	Size() int64
	// Sync makes written data durable (FSYNC, and FLUSH on every close).
	Sync() syscall.Errno
	// Allocate serves fallocate(2) (the loop device's discard and
	// write-zeroes); EOPNOTSUPP makes the kernel write zeros instead.
	Allocate(off, size int64, mode uint32) syscall.Errno
}

// ServeOptions tune Serve. The zero value serves a fresh mount.
type ServeOptions struct {
	// Readers is the number of goroutines reading requests (default 16; each
	// serves one request at a time, so it bounds the requests in progress).
	Readers int
	// Resend writes FUSE_NOTIFY_RESEND before serving: the kernel then queues
	// again every request a previous server had read but not answered. Set it
	// on every takeover, and only once the previous server can no longer
	// touch the file (its process reaped, or its Serve returned).
	Resend bool
	// Stats, if not nil, counts what this server did.
	Stats *Stats
	// Clones are descriptors of the same connection (Clone) to serve on
	// instead of dev, one reader each, when the file is an AsyncFile: the
	// asynchronous path (Readers is then unused). Whoever must resend after
	// this server dies must hold copies of them (see Clone).
	Clones []*os.File
	// SmallSize, SmallBuffers and BigBuffers size the asynchronous path's
	// buffers (defaults DefaultSmallSize, DefaultSmallBuffers,
	// DefaultBigBuffers): requests up to SmallSize bytes use a small buffer,
	// larger ones a request-sized one; they bound the requests in flight.
	// The counts are totals, shared out over the readers (each owns its
	// part: at least one of each).
	SmallSize, SmallBuffers, BigBuffers int
}

// Stats are counters of one Serve call, safe to read while it runs.
type Stats struct {
	Requests      atomic.Uint64 // requests read, FORGET and INTERRUPT included
	Resent        atomic.Uint64 // requests that carried FUSE_UNIQUE_RESEND
	Ring          atomic.Uint64 // requests that came over FUSE-over-io_uring
	Errors        atomic.Uint64 // replies with an errno from File or a bad request
	ReplyFailures atomic.Uint64 // replies the kernel refused (other than ENOENT: interrupted)
}

// ErrNoResend is returned by a Serve that should resend on a kernel without
// FUSE_NOTIFY_RESEND (before Linux 6.9).
var ErrNoResend = errors.New("fuseserve: kernel has no FUSE_NOTIFY_RESEND")

// errEnded is a reader's "connection gone" (unmounted or aborted).
var errEnded = errors.New("connection ended")

// Serve serves file on dev, a /dev/fuse descriptor whose connection has been
// through FUSE_INIT (by Mount, in this process or another one), until the
// connection ends (unmount or abort: Serve returns nil) or ctx is done (Serve
// returns ctx.Err() after every request it had read is answered; the
// connection stays up for the next server). It reads no FUSE_INIT. dev stays
// open and in blocking mode; Serve does not close it.
func Serve(ctx context.Context, dev *os.File, sess *Session, file File, opts ServeOptions) error {
	if err := sess.Validate(); err != nil {
		return err
	}
	nr := opts.Readers
	if nr == 0 {
		nr = 16
	}
	if nr < 1 || nr > 1024 {
		return fmt.Errorf("fuseserve: %d readers", nr)
	}
	fd, err := rawFD(dev)
	if err != nil {
		return err
	}
	defer runtime.KeepAlive(dev)
	if err := ctx.Err(); err != nil {
		return err
	}
	s := &server{fd: fd, sess: sess, file: file, stats: opts.Stats}
	if s.stats == nil {
		s.stats = &Stats{}
	}
	if opts.Resend {
		if !sess.HasResend() {
			return ErrNoResend
		}
		if err := s.notify(notifyResend, nil); err != nil {
			if errors.Is(err, unix.ENODEV) {
				return nil
			}
			return fmt.Errorf("fuseserve: FUSE_NOTIFY_RESEND: %w", err)
		}
	}

	if af, ok := file.(AsyncFile); ok && len(opts.Clones) > 0 {
		if err := s.serveAsync(af, opts.Clones, opts, ctx.Done()); err != nil {
			return err
		}
		return ctx.Err()
	}

	var (
		wg       sync.WaitGroup
		alive    atomic.Int32
		errMu    sync.Mutex
		firstErr error
		failed   = make(chan struct{})
		failOnce sync.Once
	)
	for range nr {
		r := newReader(s)
		wg.Add(1)
		alive.Add(1)
		go func() {
			defer wg.Done()
			defer alive.Add(-1)
			if err := r.run(); err != nil && !errors.Is(err, errEnded) {
				errMu.Lock()
				if firstErr == nil {
					firstErr = err
				}
				errMu.Unlock()
				failOnce.Do(func() { close(failed) })
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()

	select {
	case <-done:
	case <-ctx.Done():
		s.stopReaders(done, &alive)
	case <-failed:
		s.stopReaders(done, &alive)
	}
	<-done
	errMu.Lock()
	defer errMu.Unlock()
	if firstErr != nil {
		return firstErr
	}
	return ctx.Err()
}

// rawFD returns dev's descriptor without switching it to blocking mode or
// touching its flags (os.File.Fd would).
func rawFD(dev *os.File) (int, error) {
	rc, err := dev.SyscallConn()
	if err != nil {
		return -1, fmt.Errorf("fuseserve: %w", err)
	}
	fd := -1
	if err := rc.Control(func(f uintptr) { fd = int(f) }); err != nil {
		return -1, fmt.Errorf("fuseserve: %w", err)
	}
	return fd, nil
}

type server struct {
	fd    int
	sess  *Session
	file  File
	stats *Stats
	stop  atomic.Bool
}

// stopReaders makes every reader return. Readers block in read(2) on the
// descriptor, which nothing but a request ends (signals restart it, close
// does not wake it). So after setting stop it makes the kernel queue requests:
// each FUSE_NOTIFY_RETRIEVE of the file queues one FUSE_NOTIFY_REPLY (which
// expects no reply) and wakes one reader, which ignores it and sees stop.
// Leftovers are read and ignored by the next server. Retrieve needs the
// file's inode in the kernel's cache (the loop device keeps it open); if it
// is not, a stat of the file through the mount point makes a LOOKUP instead.
func (s *server) stopReaders(done <-chan struct{}, alive *atomic.Int32) {
	s.stop.Store(true)
	var body [32]byte // fuse_notify_retrieve_out: notify_unique, nodeid, offset, size
	le.PutUint64(body[8:], fileNodeID)
	var statting atomic.Bool
	for {
		for range alive.Load() {
			err := s.notify(notifyRetrieve, body[:])
			if err == unix.ENOENT && s.sess.Mountpoint != "" && statting.CompareAndSwap(false, true) {
				go func() {
					_, _ = os.Stat(filepath.Join(s.sess.Mountpoint, FileName))
					statting.Store(false)
				}()
			}
			if err != nil {
				break // ENODEV: the connection ended, readers see it too
			}
		}
		select {
		case <-done:
			return
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// notify writes a notification (unique 0, the code in the error field).
func (s *server) notify(code int32, body []byte) error {
	var b [outHeaderSize + 64]byte
	n := outHeaderSize + copy(b[outHeaderSize:], body)
	putOutHeader(b[:], n, code, 0)
	for {
		_, err := unix.Write(s.fd, b[:n])
		if err == unix.EINTR {
			continue
		}
		return err
	}
}

// reader owns its buffers: nothing is allocated per request.
type reader struct {
	s   *server
	fd  int    // read from and answered on
	in  []byte // request; the WRITE payload at in[inHeaderSize+writeInSize:] is page-aligned
	out []byte // reply; the payload at out[outHeaderSize:] is page-aligned
}

func newReader(s *server) *reader {
	payload := s.sess.maxPayload()
	return &reader{
		s:   s,
		fd:  s.fd,
		in:  alignedAt(max(minReadBufSize, inHeaderSize+writeInSize+payload), inHeaderSize+writeInSize),
		out: alignedAt(outHeaderSize+payload, outHeaderSize),
	}
}

// alignedAt returns n bytes whose byte at offset off is page-aligned.
func alignedAt(n, off int) []byte {
	const page = 4096
	b := make([]byte, n+page)
	base := uintptr(unsafe.Pointer(&b[0]))
	start := int((page - (base+uintptr(off))%page) % page)
	return b[start : start+n : start+n]
}

func (r *reader) run() error {
	s := r.s
	for !s.stop.Load() {
		n, err := unix.Read(r.fd, r.in)
		switch err {
		case nil:
		case unix.EINTR, unix.EAGAIN, unix.ENOENT: // ENOENT: request interrupted while being read
			continue
		case unix.ENODEV, unix.ECONNABORTED:
			return errEnded
		default:
			return fmt.Errorf("fuseserve: read /dev/fuse: %w", err)
		}
		if err := r.handle(n); err != nil {
			return err
		}
	}
	return nil
}

// handle serves one request of n bytes in r.in.
func (r *reader) handle(n int) error {
	s := r.s
	if n < inHeaderSize {
		s.stats.Errors.Add(1)
		return nil
	}
	req := r.in[:n]
	opcode, unique, nodeid := le.Uint32(req[4:]), le.Uint64(req[8:]), le.Uint64(req[16:])
	s.stats.Requests.Add(1)
	if unique&uniqueResend != 0 {
		s.stats.Resent.Add(1)
	}
	m, errno, reply := r.dispatch(opcode, nodeid, req[inHeaderSize:])
	if !reply {
		return nil
	}
	if errno != 0 {
		m = 0
		s.stats.Errors.Add(1)
	}
	// The unique goes back as received: a resent request's includes
	// FUSE_UNIQUE_RESEND, and the kernel looks it up with that bit.
	putOutHeader(r.out, outHeaderSize+m, -int32(errno), unique)
	for {
		_, err := unix.Write(r.fd, r.out[:outHeaderSize+m])
		switch err {
		case nil, unix.ENOENT: // ENOENT: the request was interrupted or aborted meanwhile
			return nil
		case unix.EINTR:
			continue
		case unix.ENODEV, unix.ECONNABORTED:
			return errEnded
		}
		s.stats.ReplyFailures.Add(1)
		return nil
	}
}

// dispatch serves one request; the reply payload goes to r.out[outHeaderSize:]
// and its length is returned. reply is false for requests without a reply.
func (r *reader) dispatch(opcode uint32, nodeid uint64, body []byte) (n int, errno syscall.Errno, reply bool) {
	f := r.s.file
	out := r.out[outHeaderSize:]
	switch opcode {
	case opForget, opBatchForget, opInterrupt, opNotifyReply:
		// No reply. Interrupts are not acted on: block I/O requests are short
		// and the kernel stops waiting for a killed task by itself.
		return 0, 0, false
	case opLookup:
		name := body
		if i := bytes.IndexByte(name, 0); i >= 0 {
			name = name[:i]
		}
		if nodeid != rootNodeID || string(name) != FileName {
			return 0, syscall.ENOENT, true
		}
		e := out[:entryOutSize]
		clear(e)
		le.PutUint64(e[0:], fileNodeID)
		le.PutUint64(e[16:], entryValidSeconds) // entry_valid; attr_valid stays 0
		r.fillAttr(e[40:], fileNodeID)
		return entryOutSize, 0, true
	case opGetattr, opSetattr:
		if nodeid != rootNodeID && nodeid != fileNodeID {
			return 0, syscall.ENOENT, true
		}
		if opcode == opSetattr && nodeid == fileNodeID {
			if len(body) < setattrInSize {
				return 0, syscall.EINVAL, true
			}
			// The size follows the backing store; other attributes are fixed.
			if le.Uint32(body[0:])&fattrSize != 0 && int64(le.Uint64(body[16:])) != f.Size() {
				return 0, syscall.EPERM, true
			}
		}
		a := out[:attrOutSize]
		clear(a)
		r.fillAttr(a[16:], nodeid)
		return attrOutSize, 0, true
	case opOpen, opOpendir:
		if (opcode == opOpen) != (nodeid == fileNodeID) || (nodeid != rootNodeID && nodeid != fileNodeID) {
			return 0, syscall.EISDIR, true
		}
		o := out[:openOutSize]
		clear(o)
		if opcode == opOpen {
			le.PutUint64(o[0:], 1) // fh
			le.PutUint32(o[8:], fopenDirectIO|fopenParallelDirectWrites)
		}
		return openOutSize, 0, true
	case opRead:
		if nodeid != fileNodeID || len(body) < readInSize {
			return 0, syscall.EINVAL, true
		}
		off, size := le.Uint64(body[8:]), int(le.Uint32(body[16:]))
		end := f.Size()
		if off > 1<<62 {
			return 0, syscall.EINVAL, true
		}
		if int64(off) >= end {
			return 0, 0, true
		}
		size = int(min(int64(min(size, len(out))), end-int64(off)))
		got, e := f.ReadAt(out[:size], int64(off))
		if e != 0 {
			return 0, e, true
		}
		return min(max(got, 0), size), 0, true
	case opWrite:
		if nodeid != fileNodeID || len(body) < writeInSize {
			return 0, syscall.EINVAL, true
		}
		off, size := le.Uint64(body[8:]), int(le.Uint32(body[16:]))
		data := body[writeInSize:]
		if size > len(data) || off > 1<<62 {
			return 0, syscall.EINVAL, true
		}
		if int64(off)+int64(size) > f.Size() {
			return 0, syscall.ENOSPC, true
		}
		got, e := f.WriteAt(data[:size], int64(off))
		if e != 0 {
			return 0, e, true
		}
		w := out[:writeOutSize]
		clear(w)
		le.PutUint32(w[0:], uint32(min(max(got, 0), size)))
		return writeOutSize, 0, true
	case opFsync, opFlush:
		if nodeid != fileNodeID {
			return 0, 0, true
		}
		return 0, f.Sync(), true
	case opFallocate:
		if nodeid != fileNodeID || len(body) < fallocInSize {
			return 0, syscall.EINVAL, true
		}
		off, length, mode := le.Uint64(body[8:]), le.Uint64(body[16:]), le.Uint32(body[24:])
		if off > 1<<62 || length > 1<<62 {
			return 0, syscall.EINVAL, true
		}
		return 0, f.Allocate(int64(off), int64(length), mode), true
	case opStatfs:
		st := out[:statfsOutSize]
		clear(st)
		le.PutUint64(st[0:], uint64(f.Size())/4096) // blocks
		le.PutUint32(st[40:], 4096)                 // bsize
		le.PutUint32(st[44:], 255)                  // namelen
		le.PutUint32(st[48:], 4096)                 // frsize
		return statfsOutSize, 0, true
	case opReaddir:
		if nodeid != rootNodeID || len(body) < readInSize {
			return 0, syscall.ENOTDIR, true
		}
		return r.readdir(le.Uint64(body[8:]), int(le.Uint32(body[16:]))), 0, true
	case opRelease, opReleasedir, opFsyncdir, opAccess, opDestroy:
		return 0, 0, true
	case opInit:
		// A connection that was never initialised: Mount does INIT.
		return 0, syscall.EPROTO, true
	}
	return 0, syscall.ENOSYS, true
}

const entryValidSeconds = 3600

// fillAttr writes the fuse_attr of nodeid into a (88 bytes, zeroed).
func (r *reader) fillAttr(a []byte, nodeid uint64) {
	le.PutUint64(a[0:], nodeid) // ino
	if nodeid == rootNodeID {
		le.PutUint32(a[60:], syscall.S_IFDIR|0o755)
		le.PutUint32(a[64:], 2) // nlink
		return
	}
	size := uint64(r.s.file.Size())
	le.PutUint64(a[8:], size)
	le.PutUint64(a[16:], size/512)
	le.PutUint32(a[60:], syscall.S_IFREG|0o600)
	le.PutUint32(a[64:], 1)
	le.PutUint32(a[80:], 4096) // blksize
}

// readdir lists ".", ".." and the file from entry index off (the offset of
// an entry is the index of the next one) into r.out; it returns the length.
func (r *reader) readdir(off uint64, size int) int {
	out := r.out[outHeaderSize:]
	size = min(size, len(out))
	n := 0
	for i := off; i < 3; i++ {
		name, ino, typ := ".", uint64(rootNodeID), uint32(syscall.DT_DIR)
		switch i {
		case 1:
			name = ".."
		case 2:
			name, ino, typ = FileName, fileNodeID, syscall.DT_REG
		}
		reclen := (direntHdrSize + len(name) + 7) &^ 7
		if n+reclen > size {
			break
		}
		d := out[n : n+reclen]
		clear(d)
		le.PutUint64(d[0:], ino)
		le.PutUint64(d[8:], i+1)
		le.PutUint32(d[16:], uint32(len(name)))
		le.PutUint32(d[20:], typ)
		copy(d[direntHdrSize:], name)
		n += reclen
	}
	return n
}
