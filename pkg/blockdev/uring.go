package blockdev

// An io_uring ring for the image's data I/O, with raw system calls.
//
// Why we own it: no Go io_uring library is served by the module proxy this
// project builds from (giouring, iouring-go and go-uring all answer 403), and
// the engine needs very little of io_uring: READ and WRITE on one O_DIRECT
// descriptor and a one-shot POLL_ADD (a FUSE reader's descriptor, the stop
// eventfd), submitted and reaped by the one OS thread that owns the ring.

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

const (
	sysIOURingSetup    = 425
	sysIOURingEnter    = 426
	sysIOURingRegister = 427

	uringOpPollAdd   = 6  // IORING_OP_POLL_ADD
	uringOpRead      = 22 // IORING_OP_READ
	uringOpWrite     = 23 // IORING_OP_WRITE
	uringEnterGetEv  = 1  // IORING_ENTER_GETEVENTS
	uringRegEventFD  = 4  // IORING_REGISTER_EVENTFD
	uringFeatSingle  = 1  // IORING_FEAT_SINGLE_MMAP
	uringOffSQRing   = 0
	uringOffSQEs     = 0x10000000
	uringSQESize     = 64
	uringCQESize     = 16
	uringSetupClamp  = 1 << 4 // IORING_SETUP_CLAMP
	uringSetupCQSize = 1 << 3 // IORING_SETUP_CQSIZE
	// uringSetupSingleIssuer (IORING_SETUP_SINGLE_ISSUER, Linux 6.0) and
	// uringSetupDeferTaskrun (IORING_SETUP_DEFER_TASKRUN, 6.1): one thread
	// submits, and completions are posted only when it waits for them, so
	// an I/O finishing while it works wakes nobody.
	uringSetupSingleIssuer = 1 << 12
	uringSetupDeferTaskrun = 1 << 13
)

type uringSQOff struct {
	head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
	userAddr                                                        uint64
}

type uringCQOff struct {
	head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
	userAddr                                                        uint64
}

type uringParams struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFd uint32
	resv                                                                   [3]uint32
	sq                                                                     uringSQOff
	cq                                                                     uringCQOff
}

// uring is one ring. Any goroutine may queue and submit (under mu); one
// goroutine at a time reaps. A ring set up with uringSetupSingleIssuer is
// used by the thread that set it up only.
type uring struct {
	fd      int
	entries uint32

	mu      sync.Mutex
	sqHead  *uint32 // written by the kernel
	sqTail  *uint32
	sqMask  uint32
	sqArray []uint32
	sqes    []byte
	tail    uint32 // our tail: SQEs written, published by submit

	cqHead, cqTail *uint32
	cqMask         uint32
	cqes           []byte

	ringMem, sqeMem []byte
	ev              *os.File // eventfd the kernel signals on each completion (nil: none)
}

// errRingFull: every SQE is queued and not yet consumed by the kernel.
var errRingFull = errors.New("io_uring: submission queue full")

// newURing sets up a ring of entries SQEs and 2*entries CQEs, with extra
// setup flags. With eventfd, completions signal an eventfd that waitEvent
// reads through the Go netpoller.
func newURing(entries, flags uint32, eventfd bool) (*uring, error) {
	p := uringParams{flags: uringSetupClamp | uringSetupCQSize | flags, cqEntries: 2 * entries}
	fd, _, errno := unix.Syscall(sysIOURingSetup, uintptr(entries), uintptr(unsafe.Pointer(&p)), 0)
	if errno != 0 {
		return nil, fmt.Errorf("io_uring_setup: %w", errno)
	}
	r := &uring{fd: int(fd), entries: p.sqEntries}
	ok := false
	defer func() {
		if !ok {
			r.Close()
		}
	}()
	if p.features&uringFeatSingle == 0 {
		return nil, errors.New("io_uring: kernel without IORING_FEAT_SINGLE_MMAP")
	}
	size := max(p.sq.array+p.sqEntries*4, p.cq.cqes+p.cqEntries*uringCQESize)
	var err error
	if r.ringMem, err = unix.Mmap(r.fd, uringOffSQRing, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return nil, fmt.Errorf("io_uring mmap: %w", err)
	}
	if r.sqeMem, err = unix.Mmap(r.fd, uringOffSQEs, int(p.sqEntries*uringSQESize), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return nil, fmt.Errorf("io_uring mmap: %w", err)
	}
	m := r.ringMem
	u32 := func(off uint32) *uint32 { return (*uint32)(unsafe.Pointer(&m[off])) }
	r.sqHead, r.sqTail, r.sqMask = u32(p.sq.head), u32(p.sq.tail), *u32(p.sq.ringMask)
	r.sqArray = unsafe.Slice(u32(p.sq.array), p.sqEntries)
	r.sqes = r.sqeMem
	r.cqHead, r.cqTail, r.cqMask = u32(p.cq.head), u32(p.cq.tail), *u32(p.cq.ringMask)
	r.cqes = m[p.cq.cqes : p.cq.cqes+p.cqEntries*uringCQESize]
	r.tail = atomic.LoadUint32(r.sqTail)
	if eventfd {
		efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
		if err != nil {
			return nil, fmt.Errorf("io_uring eventfd: %w", err)
		}
		r.ev = os.NewFile(uintptr(efd), "io_uring-eventfd") // non-blocking: the netpoller waits
		e32 := int32(efd)
		if _, _, errno := unix.Syscall6(sysIOURingRegister, fd, uringRegEventFD, uintptr(unsafe.Pointer(&e32)), 1, 0, 0); errno != 0 {
			return nil, fmt.Errorf("io_uring register eventfd: %w", errno)
		}
	}
	ok = true
	return r, nil
}

// queue writes one READ or WRITE SQE; it is handed to the kernel by the next
// submit (batched submission: a reader queues what it read and submits once
// before it waits for more requests). Callers hold r.mu.
func (r *uring) queueLocked(op uint8, fd int, b []byte, off int64, userData uint64) error {
	if r.tail-atomic.LoadUint32(r.sqHead) >= r.entries {
		return errRingFull
	}
	idx := r.tail & r.sqMask
	s := r.sqes[idx*uringSQESize : idx*uringSQESize+uringSQESize : idx*uringSQESize+uringSQESize]
	clear(s)
	s[0] = op
	le32(s[4:], uint32(fd))
	le64(s[8:], uint64(off))
	if len(b) > 0 {
		le64(s[16:], uint64(uintptr(unsafe.Pointer(&b[0]))))
	}
	le32(s[24:], uint32(len(b)))
	le64(s[32:], userData)
	r.sqArray[idx] = idx
	r.tail++
	return nil
}

// queuePollLocked writes a one-shot POLL_ADD SQE for POLLIN on fd.
func (r *uring) queuePollLocked(fd int, userData uint64) error {
	if r.tail-atomic.LoadUint32(r.sqHead) >= r.entries {
		return errRingFull
	}
	idx := r.tail & r.sqMask
	s := r.sqes[idx*uringSQESize : idx*uringSQESize+uringSQESize : idx*uringSQESize+uringSQESize]
	clear(s)
	s[0] = uringOpPollAdd
	le32(s[4:], uint32(fd))
	le32(s[28:], unix.POLLIN) // poll32_events
	le64(s[32:], userData)
	r.sqArray[idx] = idx
	r.tail++
	return nil
}

// submitAndWait publishes the queued SQEs, hands them to the kernel and
// waits until at least one completion is there (one io_uring_enter). A
// signal ends the wait early; the caller reaps and looks again.
func (r *uring) submitAndWait() error {
	atomic.StoreUint32(r.sqTail, r.tail)
	n := r.tail - atomic.LoadUint32(r.sqHead)
	_, _, errno := unix.Syscall6(sysIOURingEnter, uintptr(r.fd), uintptr(n), 1, uringEnterGetEv, 0, 0)
	switch errno {
	case 0, unix.EINTR, unix.EAGAIN, unix.EBUSY:
		// EAGAIN/EBUSY: completions to reap first; what was not consumed
		// goes with the next call.
		return nil
	}
	return fmt.Errorf("io_uring_enter: %w", errno)
}

// submitLocked publishes the queued SQEs and hands them to the kernel
// (io_uring_enter without waiting). Callers hold r.mu.
func (r *uring) submitLocked() error {
	atomic.StoreUint32(r.sqTail, r.tail)
	for {
		n := r.tail - atomic.LoadUint32(r.sqHead)
		if n == 0 {
			return nil
		}
		_, _, errno := unix.Syscall6(sysIOURingEnter, uintptr(r.fd), uintptr(n), 0, 0, 0, 0)
		switch errno {
		case 0:
			return nil
		case unix.EINTR:
			continue
		case unix.EAGAIN, unix.EBUSY:
			// Out of kernel resources or completions to reap first: what is
			// left goes with the next submit (the reaper submits too).
			return nil
		}
		return fmt.Errorf("io_uring_enter: %w", errno)
	}
}

// wait blocks in the kernel until at least one completion is there (the
// benchmark's mode; the engine waits on the eventfd instead).
func (r *uring) wait() error {
	for {
		_, _, errno := unix.Syscall6(sysIOURingEnter, uintptr(r.fd), 0, 1, uringEnterGetEv, 0, 0)
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return fmt.Errorf("io_uring_enter: %w", errno)
		}
		return nil
	}
}

// waitEvent waits (in the netpoller, holding no thread) until the kernel
// signalled a completion since the last call.
func (r *uring) waitEvent() error {
	var b [8]byte
	_, err := r.ev.Read(b[:])
	return err
}

// reap calls fn for every completion there and consumes them; it returns
// how many there were. One reaper at a time.
func (r *uring) reap(fn func(userData uint64, res int32)) int {
	head := atomic.LoadUint32(r.cqHead)
	tail := atomic.LoadUint32(r.cqTail)
	n := 0
	for ; head != tail; head++ {
		c := r.cqes[(head&r.cqMask)*uringCQESize:]
		fn(ule64(c[0:]), int32(ule32(c[8:])))
		n++
	}
	atomic.StoreUint32(r.cqHead, head)
	return n
}

// Close releases the ring (no I/O may be in flight).
func (r *uring) Close() {
	if r.ev != nil {
		r.ev.Close()
	}
	if r.sqeMem != nil {
		_ = unix.Munmap(r.sqeMem)
	}
	if r.ringMem != nil {
		_ = unix.Munmap(r.ringMem)
	}
	if r.fd >= 0 {
		unix.Close(r.fd)
		r.fd = -1
	}
}

func le32(b []byte, v uint32) { *(*uint32)(unsafe.Pointer(&b[0])) = v }
func le64(b []byte, v uint64) { *(*uint64)(unsafe.Pointer(&b[0])) = v }
func ule32(b []byte) uint32   { return *(*uint32)(unsafe.Pointer(&b[0])) }
func ule64(b []byte) uint64   { return *(*uint64)(unsafe.Pointer(&b[0])) }
