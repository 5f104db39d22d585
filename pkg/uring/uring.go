// Package uring is a minimal io_uring ring on raw system calls, owned by one
// OS thread: READ and WRITE at offsets, one-shot POLL_ADD, and URING_CMD
// (FUSE-over-io_uring), with batched submission and one io_uring_enter that
// submits and waits.
//
// Why we own it: no Go io_uring library is served by the module proxy this
// project builds from (giouring, iouring-go and go-uring all answer 403),
// and its users (the engine's image I/O, the FUSE server's transport) need
// very little of io_uring.
//
// A Ring is not safe for concurrent use. Rings set up with SingleIssuer are
// bound to the thread that set them up: their goroutine must be locked to
// its OS thread (runtime.LockOSThread) for the ring's whole life.
package uring

import (
	"errors"
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

const (
	sysSetup = 425 // io_uring_setup
	sysEnter = 426 // io_uring_enter

	opNop      = 0  // IORING_OP_NOP
	opPollAdd  = 6  // IORING_OP_POLL_ADD
	opRead     = 22 // IORING_OP_READ
	opWrite    = 23 // IORING_OP_WRITE
	opURingCmd = 46 // IORING_OP_URING_CMD

	enterGetEvents = 1       // IORING_ENTER_GETEVENTS
	featSingleMmap = 1       // IORING_FEAT_SINGLE_MMAP
	offSQRing      = 0       // IORING_OFF_SQ_RING
	offSQEs        = 1 << 28 // IORING_OFF_SQES
	cqeSize        = 16
	setupClamp     = 1 << 4 // IORING_SETUP_CLAMP
	setupCQSize    = 1 << 3 // IORING_SETUP_CQSIZE
)

// Flags choose how a ring is set up.
type Flags uint32

const (
	// SingleIssuer (IORING_SETUP_SINGLE_ISSUER, Linux 6.0): only the thread
	// that set the ring up submits.
	SingleIssuer Flags = 1 << 12
	// DeferTaskrun (IORING_SETUP_DEFER_TASKRUN, Linux 6.1; needs
	// SingleIssuer): completions are posted only when the owner waits for
	// them, so an I/O finishing while it works wakes nobody.
	DeferTaskrun Flags = 1 << 13
	// SQE128 (IORING_SETUP_SQE128, Linux 5.19): 128-byte entries, which
	// URING_CMD needs for its command area.
	SQE128 Flags = 1 << 10
)

// ErrFull is returned by the Prep methods when every submission entry is
// queued and not yet consumed by the kernel: Submit, then prepare again.
var ErrFull = errors.New("io_uring: submission queue full")

type sqOffsets struct {
	head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
	userAddr                                                        uint64
}

type cqOffsets struct {
	head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
	userAddr                                                        uint64
}

type params struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFd uint32
	resv                                                                   [3]uint32
	sq                                                                     sqOffsets
	cq                                                                     cqOffsets
}

// Ring is one io_uring instance with entries submission entries and twice
// as many completion entries.
type Ring struct {
	fd      int
	entries uint32
	sqeSize uint32

	sqHead  *uint32 // written by the kernel
	sqTail  *uint32
	sqMask  uint32
	sqArray []uint32
	sqes    []byte
	tail    uint32 // our tail: entries written, published by Submit

	cqHead, cqTail *uint32
	cqMask         uint32
	cqes           []byte

	ringMem, sqeMem []byte
}

// New sets up a ring of at least entries submission entries (the kernel
// clamps to its maximum).
func New(entries uint32, flags Flags) (*Ring, error) {
	p := params{flags: setupClamp | setupCQSize | uint32(flags), cqEntries: 2 * entries}
	fd, _, errno := unix.Syscall(sysSetup, uintptr(entries), uintptr(unsafe.Pointer(&p)), 0)
	if errno != 0 {
		return nil, fmt.Errorf("io_uring_setup: %w", errno)
	}
	r := &Ring{fd: int(fd), entries: p.sqEntries, sqeSize: 64}
	if flags&SQE128 != 0 {
		r.sqeSize = 128
	}
	ok := false
	defer func() {
		if !ok {
			r.Close()
		}
	}()
	if p.features&featSingleMmap == 0 {
		return nil, errors.New("io_uring: kernel without IORING_FEAT_SINGLE_MMAP")
	}
	size := max(p.sq.array+p.sqEntries*4, p.cq.cqes+p.cqEntries*cqeSize)
	var err error
	if r.ringMem, err = unix.Mmap(r.fd, offSQRing, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return nil, fmt.Errorf("io_uring mmap: %w", err)
	}
	if r.sqeMem, err = unix.Mmap(r.fd, offSQEs, int(p.sqEntries*r.sqeSize), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return nil, fmt.Errorf("io_uring mmap: %w", err)
	}
	m := r.ringMem
	u32 := func(off uint32) *uint32 { return (*uint32)(unsafe.Pointer(&m[off])) }
	r.sqHead, r.sqTail, r.sqMask = u32(p.sq.head), u32(p.sq.tail), *u32(p.sq.ringMask)
	r.sqArray = unsafe.Slice(u32(p.sq.array), p.sqEntries)
	r.sqes = r.sqeMem
	r.cqHead, r.cqTail, r.cqMask = u32(p.cq.head), u32(p.cq.tail), *u32(p.cq.ringMask)
	r.cqes = m[p.cq.cqes : p.cq.cqes+p.cqEntries*cqeSize]
	r.tail = atomic.LoadUint32(r.sqTail)
	ok = true
	return r, nil
}

// Entries is the ring's number of submission entries.
func (r *Ring) Entries() uint32 { return r.entries }

// next returns the next free submission entry, zeroed, with opcode, fd and
// user data set.
func (r *Ring) next(op uint8, fd int, userData uint64) ([]byte, error) {
	if r.tail-atomic.LoadUint32(r.sqHead) >= r.entries {
		return nil, ErrFull
	}
	idx := r.tail & r.sqMask
	s := r.sqes[idx*r.sqeSize : (idx+1)*r.sqeSize : (idx+1)*r.sqeSize]
	clear(s)
	s[0] = op
	put32(s[4:], uint32(fd))
	put64(s[32:], userData)
	r.sqArray[idx] = idx
	r.tail++
	return s, nil
}

// PrepRead queues a read of len(b) bytes at off of fd into b. b must stay
// valid (and, for the garbage collector, reachable) until its completion.
func (r *Ring) PrepRead(fd int, b []byte, off int64, userData uint64) error {
	return r.prepRW(opRead, fd, b, off, userData)
}

// PrepWrite queues a write of b at off of fd (b as for PrepRead).
func (r *Ring) PrepWrite(fd int, b []byte, off int64, userData uint64) error {
	return r.prepRW(opWrite, fd, b, off, userData)
}

func (r *Ring) prepRW(op uint8, fd int, b []byte, off int64, userData uint64) error {
	s, err := r.next(op, fd, userData)
	if err != nil {
		return err
	}
	put64(s[8:], uint64(off))
	if len(b) > 0 {
		put64(s[16:], uint64(uintptr(unsafe.Pointer(&b[0]))))
	}
	put32(s[24:], uint32(len(b)))
	return nil
}

// PrepNop queues an operation that does nothing: its completion (result 0)
// comes as soon as it is submitted.
func (r *Ring) PrepNop(userData uint64) error {
	_, err := r.next(opNop, -1, userData)
	return err
}

// PrepPoll queues a one-shot wait for fd to become readable (POLLIN); its
// completion comes when it is.
func (r *Ring) PrepPoll(fd int, userData uint64) error {
	s, err := r.next(opPollAdd, fd, userData)
	if err != nil {
		return err
	}
	put32(s[28:], unix.POLLIN) // poll32_events
	return nil
}

// PrepCmd queues a URING_CMD (needs SQE128) of cmdOp on fd, with addr and
// length in the entry's addr and len fields; it returns the entry's 80-byte
// command area for the caller to fill before the next Submit.
func (r *Ring) PrepCmd(fd int, cmdOp uint32, addr unsafe.Pointer, length uint32, userData uint64) ([]byte, error) {
	if r.sqeSize != 128 {
		return nil, errors.New("io_uring: URING_CMD needs a ring set up with SQE128")
	}
	s, err := r.next(opURingCmd, fd, userData)
	if err != nil {
		return nil, err
	}
	put32(s[8:], cmdOp)
	put64(s[16:], uint64(uintptr(addr)))
	put32(s[24:], length)
	return s[48:128], nil
}

// Submit hands the queued entries to the kernel without waiting.
func (r *Ring) Submit() error {
	return r.enter(0)
}

// SubmitAndWait hands the queued entries to the kernel and waits until at
// least one completion is there (one io_uring_enter). A signal may end the
// wait early: callers reap and look again.
func (r *Ring) SubmitAndWait() error {
	return r.enter(1)
}

func (r *Ring) enter(minComplete uint32) error {
	atomic.StoreUint32(r.sqTail, r.tail)
	var flags uintptr
	if minComplete > 0 {
		flags = enterGetEvents
	}
	for {
		n := r.tail - atomic.LoadUint32(r.sqHead)
		if n == 0 && minComplete == 0 {
			return nil
		}
		_, _, errno := unix.Syscall6(sysEnter, uintptr(r.fd), uintptr(n), uintptr(minComplete), flags, 0, 0)
		switch errno {
		case 0:
			return nil
		case unix.EINTR:
			if minComplete > 0 {
				return nil
			}
			continue
		case unix.EAGAIN, unix.EBUSY:
			// Out of kernel resources, or completions to reap first: what
			// was not consumed goes with the next call.
			return nil
		}
		return fmt.Errorf("io_uring_enter: %w", errno)
	}
}

// Reap calls fn for every completion there and consumes them; it returns
// how many there were.
func (r *Ring) Reap(fn func(userData uint64, res int32)) int {
	head := atomic.LoadUint32(r.cqHead)
	tail := atomic.LoadUint32(r.cqTail)
	n := 0
	for ; head != tail; head++ {
		c := r.cqes[(head&r.cqMask)*cqeSize:]
		// Consumed before fn runs: fn may prepare and submit more.
		atomic.StoreUint32(r.cqHead, head+1)
		fn(get64(c[0:]), int32(get32(c[8:])))
		n++
	}
	return n
}

// Close releases the ring. Requests still in flight are cancelled by the
// kernel (their buffers must stay valid until then: Close waits for that
// only as far as the kernel does).
func (r *Ring) Close() {
	if r.sqeMem != nil {
		_ = unix.Munmap(r.sqeMem)
		r.sqeMem = nil
	}
	if r.ringMem != nil {
		_ = unix.Munmap(r.ringMem)
		r.ringMem = nil
	}
	if r.fd >= 0 {
		unix.Close(r.fd)
		r.fd = -1
	}
}

func put32(b []byte, v uint32) { *(*uint32)(unsafe.Pointer(&b[0])) = v }
func put64(b []byte, v uint64) { *(*uint64)(unsafe.Pointer(&b[0])) = v }
func get32(b []byte) uint32    { return *(*uint32)(unsafe.Pointer(&b[0])) }
func get64(b []byte) uint64    { return *(*uint64)(unsafe.Pointer(&b[0])) }
