package fuseserve

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// AsyncFile is a File that serves READ and WRITE without holding the reader
// that read them: Submit starts the I/O and the File completes it later (an
// io_uring completion, say). A reader then reads the next request at once,
// so one reader keeps many requests in flight and no OS thread waits for an
// image I/O. Serve uses it on cloned descriptors (ServeOptions.Clones);
// every other request still goes through the File methods, in the reader.
type AsyncFile interface {
	File
	// Submit starts op: read op.Buf from op.Off, or write it there. It must
	// call op.Complete exactly once, now or later, from any goroutine. It
	// may hold the I/O back until Flush. op.Buf is page-aligned, its length
	// is whatever the kernel asked for (never beyond Size for a READ; a
	// WRITE beyond Size is refused before Submit).
	Submit(op *Op)
	// Flush hands on what Submit held back. A reader calls it before it
	// waits (for a request or for a free buffer): what one reader read in a
	// burst goes to the backing store in one batch.
	Flush()
}

// Op is a READ or WRITE in flight. The server owns it and its buffer; it is
// valid from Submit until Complete.
type Op struct {
	Buf   []byte // READ: fill it; WRITE: its data (the File may change it, say encrypt it in place)
	Off   int64
	Write bool
	Tag   uint64 // free for the File's use between Submit and Complete

	as     *asyncServer
	fd     int // the descriptor the request came from: the reply goes there
	unique uint64
	buf    []byte // the whole buffer
	big    bool   // a request-shaped buffer (payload at bigPayloadOff)
	hdr    [outHeaderSize + writeOutSize]byte
	iov    [2]unix.Iovec
}

// Complete answers op's request: n bytes read or written, or errno. op must
// not be used afterwards.
func (op *Op) Complete(n int, errno syscall.Errno) {
	as := op.as
	var err syscall.Errno
	switch {
	case errno != 0:
		as.s.stats.Errors.Add(1)
		putOutHeader(op.hdr[:], outHeaderSize, -int32(errno), op.unique)
		err = rawWrite(op.fd, op.hdr[:outHeaderSize])
	case op.Write:
		putOutHeader(op.hdr[:], outHeaderSize+writeOutSize, 0, op.unique)
		le.PutUint32(op.hdr[outHeaderSize:], uint32(min(max(n, 0), len(op.Buf))))
		le.PutUint32(op.hdr[outHeaderSize+4:], 0)
		err = rawWrite(op.fd, op.hdr[:])
	default:
		n = min(max(n, 0), len(op.Buf))
		putOutHeader(op.hdr[:], outHeaderSize+n, 0, op.unique)
		op.iov[0].Base = &op.hdr[0]
		op.iov[0].SetLen(outHeaderSize)
		nv := 1
		if n > 0 {
			op.iov[1].Base = &op.Buf[0]
			op.iov[1].SetLen(n)
			nv = 2
		}
		err = rawWritev(op.fd, &op.iov[0], nv)
	}
	switch err {
	case 0, unix.ENOENT, unix.ENODEV, unix.ECONNABORTED:
		// ENOENT: interrupted or aborted meanwhile; ENODEV: the connection ended.
	default:
		as.s.stats.ReplyFailures.Add(1)
	}
	op.Buf = nil
	if op.big {
		as.big <- op
	} else {
		as.small <- op
	}
	as.inflight.Done()
}

func rawWrite(fd int, b []byte) syscall.Errno {
	for {
		_, _, e := unix.Syscall(unix.SYS_WRITE, uintptr(fd), uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)))
		if e != unix.EINTR {
			return e
		}
	}
}

func rawWritev(fd int, iov *unix.Iovec, n int) syscall.Errno {
	for {
		_, _, e := unix.Syscall(unix.SYS_WRITEV, uintptr(fd), uintptr(unsafe.Pointer(iov)), uintptr(n))
		if e != unix.EINTR {
			return e
		}
	}
}

// bigPayloadOff is where a WRITE's data starts in a request buffer; request
// buffers are allocated so that it is page-aligned.
const bigPayloadOff = inHeaderSize + writeInSize

// Defaults of the asynchronous path's buffers (ServeOptions).
const (
	// DefaultSmallSize covers the 4 KiB requests of random I/O (and small
	// merges) without a request-sized buffer each.
	DefaultSmallSize = 16 << 10
	// DefaultSmallBuffers: as many as the kernel sends at once (the mount's
	// max_background is 64), so small requests never wait for a buffer.
	DefaultSmallBuffers = 64
	// DefaultBigBuffers bounds the large requests in flight: 8 of up to
	// 1 MiB, so the engine's buffers stay near 12 MiB with 2 readers (each
	// holds one more) and its RSS within 32 MiB: with 12 the peak RSS under
	// bench/fio-driver.sh was 30-37 MiB.
	DefaultBigBuffers = 8
)

type asyncServer struct {
	s        *server
	file     AsyncFile
	big      chan *Op
	small    chan *Op
	smallSz  int
	inflight sync.WaitGroup
}

// asyncReader reads one cloned descriptor through the Go netpoller (the
// descriptor is non-blocking: a reader waiting for requests holds no thread).
type asyncReader struct {
	as     *asyncServer
	f      *os.File
	rc     syscall.RawConn
	fd     int
	rbuf   []byte // request-shaped; swapped with a big Op's for large WRITEs
	sync   *reader
	n      int
	err    error
	readFn func(fd uintptr) bool
}

// serveAsync serves file with one reader per clone.
func (s *server) serveAsync(file AsyncFile, clones []*os.File, opts ServeOptions, ctxDone <-chan struct{}) error {
	payload := s.sess.maxPayload()
	smallSz := opts.SmallSize
	if smallSz <= 0 {
		smallSz = DefaultSmallSize
	}
	nSmall, nBig := opts.SmallBuffers, opts.BigBuffers
	if nSmall <= 0 {
		nSmall = DefaultSmallBuffers
	}
	if nBig <= 0 {
		nBig = DefaultBigBuffers
	}
	as := &asyncServer{s: s, file: file, big: make(chan *Op, nBig), small: make(chan *Op, nSmall), smallSz: smallSz}
	bigBuf := func() []byte {
		return alignedAt(max(minReadBufSize, bigPayloadOff+payload), bigPayloadOff)
	}
	for range nBig {
		as.big <- &Op{as: as, buf: bigBuf(), big: true}
	}
	for range nSmall {
		as.small <- &Op{as: as, buf: alignedAt(smallSz, 0)}
	}

	var readers []*asyncReader
	defer func() {
		for _, r := range readers {
			r.f.Close()
		}
	}()
	for _, c := range clones {
		cfd, err := rawFD(c)
		if err != nil {
			return err
		}
		// A pollable copy: the netpoller waits for requests. O_NONBLOCK is
		// on the open file, which the supervisor's copy shares; it never
		// reads from it.
		dfd, err := unix.Dup(cfd)
		if err != nil {
			return fmt.Errorf("fuseserve: dup: %w", err)
		}
		unix.CloseOnExec(dfd)
		if err := unix.SetNonblock(dfd, true); err != nil {
			unix.Close(dfd)
			return fmt.Errorf("fuseserve: %w", err)
		}
		f := os.NewFile(uintptr(dfd), "/dev/fuse")
		rc, err := f.SyscallConn()
		if err != nil {
			f.Close()
			return fmt.Errorf("fuseserve: %w", err)
		}
		r := &asyncReader{as: as, f: f, rc: rc, fd: dfd, rbuf: bigBuf()}
		r.sync = &reader{s: s, fd: dfd, in: r.rbuf, out: alignedAt(outHeaderSize+2*minReadBufSize, outHeaderSize)}
		r.readFn = r.read
		readers = append(readers, r)
	}

	var (
		wg       sync.WaitGroup
		errMu    sync.Mutex
		firstErr error
		failed   = make(chan struct{})
		failOnce sync.Once
	)
	for _, r := range readers {
		wg.Go(func() {
			if err := r.run(); err != nil && !errors.Is(err, errEnded) {
				errMu.Lock()
				if firstErr == nil {
					firstErr = err
				}
				errMu.Unlock()
				failOnce.Do(func() { close(failed) })
			}
		})
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctxDone:
	case <-failed:
	}
	s.stop.Store(true)
	for _, r := range readers {
		_ = r.f.SetReadDeadline(time.Now())
	}
	<-done
	// Every request read is answered before Serve returns.
	file.Flush()
	as.inflight.Wait()
	errMu.Lock()
	defer errMu.Unlock()
	return firstErr
}

// read is the RawConn.Read callback: false (wait for readiness) when no
// request is queued, after flushing what this burst submitted.
func (r *asyncReader) read(fd uintptr) bool {
	n, err := unix.Read(int(fd), r.rbuf)
	if err == unix.EAGAIN {
		r.as.file.Flush()
		return false
	}
	r.n, r.err = n, err
	return true
}

func (r *asyncReader) run() error {
	s := r.as.s
	for !s.stop.Load() {
		if err := r.rc.Read(r.readFn); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, os.ErrClosed) {
				return nil
			}
			return fmt.Errorf("fuseserve: read /dev/fuse: %w", err)
		}
		switch r.err {
		case nil:
		case unix.EINTR, unix.ENOENT:
			continue
		case unix.ENODEV, unix.ECONNABORTED:
			return errEnded
		default:
			return fmt.Errorf("fuseserve: read /dev/fuse: %w", r.err)
		}
		if err := r.handle(r.n); err != nil {
			return err
		}
	}
	return nil
}

// handle starts a READ or WRITE of n bytes in r.rbuf asynchronously and
// serves anything else (or a bad READ or WRITE) in place.
func (r *asyncReader) handle(n int) error {
	as, s := r.as, r.as.s
	if n >= inHeaderSize {
		req := r.rbuf[:n]
		opcode, unique, nodeid := le.Uint32(req[4:]), le.Uint64(req[8:]), le.Uint64(req[16:])
		body := req[inHeaderSize:]
		switch {
		case opcode == opRead && nodeid == fileNodeID && len(body) >= readInSize:
			off, size := le.Uint64(body[8:]), int(le.Uint32(body[16:]))
			end := as.file.Size()
			if off > 1<<62 || int64(off) >= end {
				break // answered in place
			}
			size = int(min(int64(min(size, s.sess.maxPayload())), end-int64(off)))
			op := r.op(size > as.smallSz)
			op.Buf = op.payload(size)
			r.start(op, false, int64(off), unique)
			return nil
		case opcode == opWrite && nodeid == fileNodeID && len(body) >= writeInSize:
			off, size := le.Uint64(body[8:]), int(le.Uint32(body[16:]))
			data := body[writeInSize:]
			if size > len(data) || off > 1<<62 || int64(off)+int64(size) > as.file.Size() {
				break
			}
			var op *Op
			if size <= as.smallSz {
				op = r.op(false)
				op.Buf = op.payload(size)
				copy(op.Buf, data[:size])
			} else {
				// The data stays where it was read: the request buffer goes
				// with the Op, the reader takes the Op's buffer.
				op = r.op(true)
				op.buf, r.rbuf = r.rbuf, op.buf
				r.sync.in = r.rbuf
				op.Buf = op.payload(size)
			}
			r.start(op, true, int64(off), unique)
			return nil
		}
	}
	return r.sync.handle(n)
}

func (r *asyncReader) start(op *Op, write bool, off int64, unique uint64) {
	s := r.as.s
	s.stats.Requests.Add(1)
	if unique&uniqueResend != 0 {
		s.stats.Resent.Add(1)
	}
	op.Off, op.Write, op.unique, op.fd = off, write, unique, r.fd
	r.as.inflight.Add(1)
	r.as.file.Submit(op)
}

// op takes a free Op (a big one for payloads above the small size); when
// none is free it flushes first, so that completions come.
func (r *asyncReader) op(big bool) *Op {
	pool := r.as.small
	if big {
		pool = r.as.big
	}
	select {
	case op := <-pool:
		return op
	default:
	}
	r.as.file.Flush()
	return <-pool
}

func (op *Op) payload(size int) []byte {
	if op.big {
		return op.buf[bigPayloadOff : bigPayloadOff+size : bigPayloadOff+size]
	}
	return op.buf[:size:size]
}
