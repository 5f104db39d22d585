package fuseserve

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/csi-encdisk/csi-encdisk/pkg/uring"
)

// AsyncFile is a File that serves READ and WRITE without holding the server
// thread that read them: each thread has an io_uring ring and a Queue of the
// file's on it; Submit prepares the I/O on the ring and the completion comes
// back to Queue.Complete. A thread reads requests until none is left, then
// submits everything prepared and waits, in one io_uring_enter, for
// whichever comes first: a completion or a new request (a poll on its
// descriptor in the same ring). So a burst of requests costs one wait, and
// no thread sleeps for one I/O. Serve uses it on cloned descriptors
// (ServeOptions.Clones); every other request still goes through the File
// methods, in the thread.
type AsyncFile interface {
	File
	// NewQueue makes the queue of one server thread, whose I/O goes on ring.
	// It is called on that thread (its goroutine is locked to it, the ring
	// is single-issuer where the kernel has that), the only user of the
	// queue and of ring until Close.
	NewQueue(ring *uring.Ring) (Queue, error)
}

// Queue is one server thread's asynchronous I/O (AsyncFile.NewQueue).
type Queue interface {
	// Submit starts op: read op.Buf from op.Off, or write it there, by
	// preparing I/O on the ring with user data below FileTagLimit (the
	// server submits it). op.Complete must be called exactly once, by
	// Submit (an error found at once) or by Complete. op.Buf is
	// page-aligned, its length is whatever the kernel asked for (never
	// beyond Size for a READ; a WRITE beyond Size is refused before Submit).
	Submit(op *Op)
	// Complete is called with every completion of the ring whose user data
	// is below FileTagLimit.
	Complete(userData uint64, res int32)
	// Close releases the queue; no I/O of it is in flight.
	Close()
}

// FileTagLimit bounds the user data a Queue may give its I/O on the ring;
// the server uses the values above.
const FileTagLimit = 1 << 62

// The server's user data on a ring.
const (
	tagPollDev  = FileTagLimit + iota // the thread's /dev/fuse descriptor is readable
	tagPollStop                       // the server stops
)

// Op is a READ or WRITE in flight. The server owns it and its buffer; it is
// valid from Submit until Complete.
type Op struct {
	Buf   []byte // READ: fill it; WRITE: its data (the File may change it, say encrypt it in place)
	Off   int64
	Write bool
	Tag   uint64 // free for the File's use between Submit and Complete

	owner  opOwner // answers the request and takes the Op back
	unique uint64
	buf    []byte // the whole buffer
	big    bool   // a request-shaped buffer (payload at bigPayloadOff)
	hdr    [outHeaderSize + writeOutSize]byte
	iov    [2]unix.Iovec
}

// Complete answers op's request: n bytes read or written, or errno. It must
// be called on the thread that submitted op (in Queue.Submit or
// Queue.Complete); op must not be used afterwards.
func (op *Op) Complete(n int, errno syscall.Errno) { op.owner.reply(op, n, errno) }

// opOwner is the transport an Op came from: a classic reader (the reply is
// written to its descriptor) or a FUSE-over-io_uring entry (the reply goes
// into the entry and commits it).
type opOwner interface {
	reply(op *Op, n int, errno syscall.Errno)
}

// reply writes op's reply to the descriptor it was read from and puts op
// back in the reader's pool.
func (r *asyncReader) reply(op *Op, n int, errno syscall.Errno) {
	stats := r.as.s.stats
	var err syscall.Errno
	switch {
	case errno != 0:
		stats.Errors.Add(1)
		putOutHeader(op.hdr[:], outHeaderSize, -int32(errno), op.unique)
		err = rawWrite(r.fd, op.hdr[:outHeaderSize])
	case op.Write:
		putOutHeader(op.hdr[:], outHeaderSize+writeOutSize, 0, op.unique)
		le.PutUint32(op.hdr[outHeaderSize:], uint32(min(max(n, 0), len(op.Buf))))
		le.PutUint32(op.hdr[outHeaderSize+4:], 0)
		err = rawWrite(r.fd, op.hdr[:])
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
		err = rawWritev(r.fd, &op.iov[0], nv)
	}
	switch err {
	case 0, unix.ENOENT, unix.ENODEV, unix.ECONNABORTED:
		// ENOENT: interrupted or aborted meanwhile; ENODEV: the connection ended.
	default:
		stats.ReplyFailures.Add(1)
	}
	op.Buf = nil
	if op.big {
		r.big = append(r.big, op)
	} else {
		r.small = append(r.small, op)
	}
	r.inflight--
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

// Defaults of the asynchronous path's buffers (ServeOptions), in total over
// the readers (each gets its share, at least one of each kind).
const (
	// DefaultSmallSize covers the 4 KiB requests of random I/O (and small
	// merges) without a request-sized buffer each.
	DefaultSmallSize = 16 << 10
	// DefaultSmallBuffers: as many as the kernel sends at once (the mount's
	// max_background is 64), so small requests never wait for a buffer.
	DefaultSmallBuffers = 64
	// DefaultBigBuffers bounds the large requests in flight: 6 of up to
	// 1 MiB (3 a reader with 2 readers, each holding one more for reading),
	// so the engine's buffers stay near 9 MiB and its RSS within 32 MiB:
	// with 8 the peak RSS under bench/fio-driver.sh was 32.6-33.4 MiB
	// (16 MiB anonymous, 17 MiB of the binary's pages), with 12 30-37 MiB.
	// A reader without a free big buffer waits for its own completions and
	// leaves new requests to the other readers, which spreads the
	// decryption of large reads over the CPUs.
	DefaultBigBuffers = 6
)

type asyncServer struct {
	s       *server
	file    AsyncFile
	smallSz int
	stopFD  int // an eventfd, readable once the server stops
}

// asyncReader reads one cloned descriptor (non-blocking) and owns its Ops
// and its ring: everything about a request it read happens on its
// goroutine, which is locked to its OS thread (a ring's I/O completes to the
// thread that submitted it, so completions wake the thread that waits).
type asyncReader struct {
	as       *asyncServer
	fd       int
	rbuf     []byte // request-shaped; swapped with a big Op's for large WRITEs
	sync     *reader
	ring     *uring.Ring
	q        Queue
	big      []*Op // free Ops
	small    []*Op
	inflight int // Ops submitted and not completed
	// devPolled, stopPolled: a poll of the descriptor, of the stop eventfd
	// is in flight; stopped: the stop eventfd was seen readable.
	devPolled, stopPolled, stopped bool
	completeFn                     func(uint64, int32) // r.complete, bound once
}

// ringEntries: every Op of a reader (one reader takes all of them at most)
// and the two polls.
const ringEntries = 128

// newRing sets up a reader's ring: single-issuer with deferred task work
// where the kernel has them (Linux 6.1), so completions are posted when the
// reader waits for them; a plain ring before that.
func newRing() (*uring.Ring, error) {
	r, err := uring.New(ringEntries, uring.SingleIssuer|uring.DeferTaskrun)
	if err != nil {
		return uring.New(ringEntries, 0)
	}
	return r, nil
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
	stopFD, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return fmt.Errorf("fuseserve: eventfd: %w", err)
	}
	defer unix.Close(stopFD)
	as := &asyncServer{s: s, file: file, smallSz: smallSz, stopFD: stopFD}
	bigBuf := func() []byte {
		return alignedAt(max(minReadBufSize, bigPayloadOff+payload), bigPayloadOff)
	}

	if s.sess.IOURing() {
		// The ring carries READ and WRITE; one classic reader takes what
		// still comes through /dev/fuse (requests before the ring is live,
		// FORGET, INTERRUPT).
		clones = clones[:1]
	}
	var readers []*asyncReader
	defer func() {
		for _, r := range readers {
			unix.Close(r.fd)
		}
	}()
	for i, c := range clones {
		cfd, err := rawFD(c)
		if err != nil {
			return err
		}
		// A non-blocking copy: the reader reads until EAGAIN, then waits in
		// its queue. O_NONBLOCK is on the open file, which the supervisor's
		// copy shares; it never reads from it.
		dfd, err := unix.Dup(cfd)
		if err != nil {
			return fmt.Errorf("fuseserve: dup: %w", err)
		}
		unix.CloseOnExec(dfd)
		r := &asyncReader{as: as, fd: dfd}
		readers = append(readers, r)
		if err := unix.SetNonblock(dfd, true); err != nil {
			return fmt.Errorf("fuseserve: %w", err)
		}
		r.rbuf = bigBuf()
		r.sync = &reader{s: s, fd: dfd, in: r.rbuf, out: alignedAt(outHeaderSize+2*minReadBufSize, outHeaderSize)}
		// This reader's share of the buffers.
		for range max(1, share(nBig, len(clones), i)) {
			r.big = append(r.big, &Op{owner: r, buf: bigBuf(), big: true})
		}
		for range max(1, share(nSmall, len(clones), i)) {
			r.small = append(r.small, &Op{owner: r, buf: alignedAt(smallSz, 0)})
		}
	}

	var (
		wg       sync.WaitGroup
		errMu    sync.Mutex
		firstErr error
		failed   = make(chan struct{})
		failOnce sync.Once
	)
	runners := make([]func() error, 0, len(readers))
	for _, r := range readers {
		runners = append(runners, r.run)
	}
	if s.sess.IOURing() {
		qs, err := as.uringQueues(readers[0].fd)
		if err != nil {
			return err
		}
		for _, q := range qs {
			runners = append(runners, q.run)
		}
	}
	for _, run := range runners {
		wg.Go(func() {
			if err := run(); err != nil && !errors.Is(err, errEnded) {
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
	one := [8]byte{1}
	if _, err := unix.Write(stopFD, one[:]); err != nil {
		return fmt.Errorf("fuseserve: stopping the readers: %w", err)
	}
	// Every request read is answered before the readers return.
	<-done
	errMu.Lock()
	defer errMu.Unlock()
	return firstErr
}

// share is reader i's part of n things split over k readers.
func share(n, k, i int) int {
	return n/k + btoi(i < n%k)
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

func (r *asyncReader) run() (err error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if r.ring, err = newRing(); err != nil {
		return fmt.Errorf("fuseserve: reader ring: %w", err)
	}
	defer r.ring.Close()
	if r.q, err = r.as.file.NewQueue(r.ring); err != nil {
		return fmt.Errorf("fuseserve: reader queue: %w", err)
	}
	r.completeFn = r.complete
	defer func() {
		// Answer every request this reader read before it goes.
		for r.inflight > 0 {
			if werr := r.wait(false); werr != nil {
				err = errors.Join(err, werr)
				break
			}
		}
		r.q.Close()
	}()
	s := r.as.s
	for !s.stop.Load() {
		n, err := unix.Read(r.fd, r.rbuf)
		switch err {
		case nil:
		case unix.EAGAIN:
			if err := r.wait(true); err != nil {
				return err
			}
			continue
		case unix.EINTR, unix.ENOENT:
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

// wait submits what the queue prepared and waits for a completion, for the
// stop eventfd, and with dev for the descriptor to be readable.
func (r *asyncReader) wait(dev bool) error {
	if dev && !r.devPolled {
		if err := r.prep(func() error { return r.ring.PrepPoll(r.fd, tagPollDev) }); err != nil {
			return err
		}
		r.devPolled = true
	}
	if !r.stopPolled && !r.stopped {
		if err := r.prep(func() error { return r.ring.PrepPoll(r.as.stopFD, tagPollStop) }); err != nil {
			return err
		}
		r.stopPolled = true
	}
	if r.ring.Reap(r.completeFn) > 0 {
		return r.ring.Submit()
	}
	if err := r.ring.SubmitAndWait(); err != nil {
		return fmt.Errorf("fuseserve: reader ring: %w", err)
	}
	r.ring.Reap(r.completeFn)
	return nil
}

// prep runs add (which prepares one entry), submitting first when the ring
// is full.
func (r *asyncReader) prep(add func() error) error {
	return prepare(r.ring, "reader ring", add)
}

// prepare runs add (which prepares one entry on ring), submitting what is
// queued first when the ring is full; errors name the ring as what.
func prepare(ring *uring.Ring, what string, add func() error) error {
	err := add()
	if err == uring.ErrFull {
		if err = ring.Submit(); err == nil {
			err = add()
		}
	}
	if err != nil {
		return fmt.Errorf("fuseserve: %s: %w", what, err)
	}
	return nil
}

// complete handles one completion of the reader's ring.
func (r *asyncReader) complete(userData uint64, res int32) {
	switch userData {
	case tagPollDev:
		r.devPolled = false
	case tagPollStop:
		r.stopPolled, r.stopped = false, true
	default:
		if userData < FileTagLimit {
			r.q.Complete(userData, res)
		}
	}
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
			op, err := r.op(size > as.smallSz)
			if err != nil {
				return err
			}
			op.Buf = op.payload(size)
			r.start(op, false, int64(off), unique)
			return nil
		case opcode == opWrite && nodeid == fileNodeID && len(body) >= writeInSize:
			off, size := le.Uint64(body[8:]), int(le.Uint32(body[16:]))
			data := body[writeInSize:]
			if size > len(data) || off > 1<<62 || int64(off)+int64(size) > as.file.Size() {
				break
			}
			if size <= as.smallSz {
				op, err := r.op(false)
				if err != nil {
					return err
				}
				op.Buf = op.payload(size)
				copy(op.Buf, data[:size])
				r.start(op, true, int64(off), unique)
				return nil
			}
			// The data stays where it was read: the request buffer goes
			// with the Op, the reader takes the Op's buffer (waiting for a
			// free Op does not touch r.rbuf).
			op, err := r.op(true)
			if err != nil {
				return err
			}
			op.buf, r.rbuf = r.rbuf, op.buf
			r.sync.in = r.rbuf
			op.Buf = op.payload(size)
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
	op.Off, op.Write, op.unique = off, write, unique
	r.inflight++
	r.q.Submit(op)
}

// op takes a free Op (a big one for payloads above the small size); when
// none is free it waits for completions, which free some (the reader's Ops
// are in flight on its own ring).
func (r *asyncReader) op(big bool) (*Op, error) {
	pool := &r.small
	if big {
		pool = &r.big
	}
	for len(*pool) == 0 {
		if err := r.wait(false); err != nil {
			return nil, err
		}
	}
	p := *pool
	op := p[len(p)-1]
	*pool = p[:len(p)-1]
	return op, nil
}

func (op *Op) payload(size int) []byte {
	if op.big {
		return op.buf[bigPayloadOff : bigPayloadOff+size : bigPayloadOff+size]
	}
	return op.buf[:size:size]
}
