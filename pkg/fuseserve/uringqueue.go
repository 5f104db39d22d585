package fuseserve

// FUSE-over-io_uring (Linux 6.14): instead of read(2) and write(2) on
// /dev/fuse, the server registers ring entries (a header buffer and a
// payload buffer each) with URING_CMD on its own io_uring rings, one queue
// per possible CPU; the kernel puts a request into an idle entry of the
// queue of the CPU that made it and completes the entry's command; the
// server writes the reply into the same buffers and commits it with a
// COMMIT_AND_FETCH command, which also re-arms the entry. A queue thread's
// ring carries the file's I/O too (AsyncFile), so one io_uring_enter submits
// replies, re-arms entries and image I/O, and waits for all of them.
//
// Why we own it: no served Go library speaks FUSE-over-io_uring (go-fuse
// only names the capability bit).
//
// The price: the kernel does not resend requests held in ring entries when
// their server dies (FUSE_NOTIFY_RESEND walks /dev/fuse queues only), so a
// connection on rings cannot be taken over: a crashed server strands what it
// held until the connection is aborted.

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/csi-encdisk/csi-encdisk/pkg/uring"
)

const (
	uringCmdRegister       = 1 // FUSE_IO_URING_CMD_REGISTER
	uringCmdCommitAndFetch = 2 // FUSE_IO_URING_CMD_COMMIT_AND_FETCH

	// struct fuse_uring_req_header: in_out (the fuse_in_header of a
	// request, the fuse_out_header of its reply), op_in (the request's
	// first argument), ring_ent_in_out.
	ringHdrSize  = 288
	ringHdrOpIn  = 128
	ringHdrEntIO = 256 // struct fuse_uring_ent_in_out: flags, commit_id, payload_sz

	// ringEntriesTotal bounds the entries of all queues together: each
	// holds a payload buffer of the connection's largest request.
	ringEntriesTotal = 32
	// tagEnt is the user data of the first entry's commands.
	tagEnt = FileTagLimit + 16
)

// ringEnt is one registered entry and the Op of the request it holds.
type ringEnt struct {
	q   *uringQueue
	idx int
	hdr []byte // ringHdrSize
	pay []byte // the payload buffer
	iov [2]unix.Iovec
	op  Op
	// unique and commitID of the request it holds.
	unique, commitID uint64
	ended            bool // the kernel gave the entry back with an error
}

// uringQueue is the thread serving one queue of the connection's rings.
type uringQueue struct {
	as   *asyncServer
	qid  uint16
	name string // "queue N", for errors
	cpu  int    // pinned to it when allowed
	fd   int    // a /dev/fuse descriptor of the connection
	ring *uring.Ring
	q    Queue
	ents []*ringEnt
	sync *reader // serves requests other than READ and WRITE of the file

	live, inflight      int
	stopPolled, stopped bool
	completeFn          func(uint64, int32)
}

// IOURingParam is the fuse module parameter that lets servers ask for
// FUSE-over-io_uring (off by default).
const IOURingParam = "/sys/module/fuse/parameters/enable_uring"

// EnableIOURing sets IOURingParam (root only). It changes nothing for
// connections that do not ask for rings.
func EnableIOURing() error {
	if err := os.WriteFile(IOURingParam, []byte("Y"), 0o644); err != nil {
		return fmt.Errorf("fuseserve: kernel without FUSE-over-io_uring, or not root: %w", err)
	}
	return nil
}

// possibleCPUs is the number of CPUs the kernel may ever bring online: the
// number of FUSE ring queues it expects.
func possibleCPUs() (int, error) {
	b, err := os.ReadFile("/sys/devices/system/cpu/possible")
	if err != nil {
		return 0, err
	}
	n := 0
	for _, part := range strings.Split(strings.TrimSpace(string(b)), ",") {
		lo, hi, ok := strings.Cut(part, "-")
		a, err := strconv.Atoi(lo)
		if err != nil {
			return 0, fmt.Errorf("cpu/possible %q: %w", b, err)
		}
		z := a
		if ok {
			if z, err = strconv.Atoi(hi); err != nil {
				return 0, fmt.Errorf("cpu/possible %q: %w", b, err)
			}
		}
		n = max(n, z+1)
	}
	return n, nil
}

// uringQueues makes a queue per possible CPU, each with its share of
// ringEntriesTotal entries (at least 2), on the connection's descriptor fd.
func (as *asyncServer) uringQueues(fd int) ([]*uringQueue, error) {
	nq, err := possibleCPUs()
	if err != nil {
		return nil, fmt.Errorf("fuseserve: FUSE-over-io_uring queues: %w", err)
	}
	depth := max(2, ringEntriesTotal/nq)
	payload := max(minReadBufSize, as.s.sess.maxPayload())
	var qs []*uringQueue
	for qid := range nq {
		q := &uringQueue{as: as, qid: uint16(qid), name: fmt.Sprintf("queue %d", qid), cpu: qid, fd: fd}
		q.sync = &reader{s: as.s, fd: fd, out: alignedAt(outHeaderSize+2*minReadBufSize, outHeaderSize)}
		for i := range depth {
			e := &ringEnt{q: q, idx: i, hdr: alignedAt(ringHdrSize, 0), pay: alignedAt(payload, 0)}
			e.iov[0].Base = &e.hdr[0]
			e.iov[0].SetLen(ringHdrSize)
			e.iov[1].Base = &e.pay[0]
			e.iov[1].SetLen(payload)
			e.op.owner = e
			q.ents = append(q.ents, e)
		}
		qs = append(qs, q)
	}
	return qs, nil
}

func (q *uringQueue) run() (err error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var set unix.CPUSet
	set.Set(q.cpu)
	_ = unix.SchedSetaffinity(0, &set) // best effort: a cpuset may not allow it
	n := uint32(2*len(q.ents) + 4)     // commands, the file's I/O, the stop poll
	if q.ring, err = uring.New(n, uring.SQE128|uring.SingleIssuer|uring.DeferTaskrun); err != nil {
		if q.ring, err = uring.New(n, uring.SQE128); err != nil {
			return fmt.Errorf("fuseserve: FUSE-over-io_uring queue %d: %w", q.qid, err)
		}
	}
	defer q.ring.Close()
	if q.q, err = q.as.file.NewQueue(q.ring); err != nil {
		return fmt.Errorf("fuseserve: queue %d: %w", q.qid, err)
	}
	defer q.q.Close()
	q.completeFn = q.complete
	for _, e := range q.ents {
		if err := q.command(e, uringCmdRegister); err != nil {
			return err
		}
	}
	q.live = len(q.ents)
	for q.live > 0 && !(q.stopped && q.inflight == 0) {
		if !q.stopPolled && !q.stopped {
			if err := q.prep(func() error { return q.ring.PrepPoll(q.as.stopFD, tagPollStop) }); err != nil {
				return err
			}
			q.stopPolled = true
		}
		if err := q.ring.SubmitAndWait(); err != nil {
			return fmt.Errorf("fuseserve: queue %d: %w", q.qid, err)
		}
		q.ring.Reap(q.completeFn)
	}
	// Stopped (requests still held by the kernel's idle entries are
	// cancelled when the ring closes) or every entry ended (the
	// connection is gone).
	return nil
}

// prep runs add (which prepares one entry), submitting first when the ring
// is full.
func (q *uringQueue) prep(add func() error) error {
	return prepare(q.ring, q.name, add)
}

// command prepares REGISTER or COMMIT_AND_FETCH of entry e.
func (q *uringQueue) command(e *ringEnt, op uint32) error {
	return q.prep(func() error {
		var addr unsafe.Pointer
		var n uint32
		if op == uringCmdRegister {
			addr, n = unsafe.Pointer(&e.iov[0]), 2
		}
		cmd, err := q.ring.PrepCmd(q.fd, op, addr, n, tagEnt+uint64(e.idx))
		if err != nil {
			return err
		}
		// struct fuse_uring_cmd_req: flags, commit_id, qid.
		le.PutUint64(cmd[0:], 0)
		if op == uringCmdCommitAndFetch {
			le.PutUint64(cmd[8:], e.commitID)
		}
		le.PutUint16(cmd[16:], q.qid)
		return nil
	})
}

// complete handles one completion of the queue's ring.
func (q *uringQueue) complete(userData uint64, res int32) {
	switch {
	case userData == tagPollStop:
		q.stopPolled, q.stopped = false, true
	case userData >= tagEnt && userData < tagEnt+uint64(len(q.ents)):
		e := q.ents[userData-tagEnt]
		if res < 0 {
			// ENOTCONN/ENODEV: the connection is gone or the ring torn down.
			if !e.ended {
				e.ended = true
				q.live--
			}
			return
		}
		q.request(e)
	case userData < FileTagLimit:
		q.q.Complete(userData, res)
	}
}

// request serves the request the kernel put into e.
func (q *uringQueue) request(e *ringEnt) {
	s := q.as.s
	in := e.hdr[:inHeaderSize]
	opcode, nodeid := le.Uint32(in[4:]), le.Uint64(in[16:])
	e.unique = le.Uint64(in[8:])
	eio := e.hdr[ringHdrEntIO:]
	e.commitID = le.Uint64(eio[8:])
	psz := int(min(le.Uint32(eio[16:]), uint32(len(e.pay))))
	opIn := e.hdr[ringHdrOpIn:ringHdrEntIO]
	s.stats.Requests.Add(1)
	s.stats.Ring.Add(1)
	if nodeid == fileNodeID && (opcode == opRead || opcode == opWrite) {
		off, size := le.Uint64(opIn[8:]), int(le.Uint32(opIn[16:]))
		end := s.file.Size()
		switch {
		case off > 1<<62:
			q.commit(e, 0, syscall.EINVAL)
		case opcode == opRead && int64(off) >= end:
			q.commit(e, 0, 0)
		case opcode == opRead:
			size = int(min(int64(min(size, len(e.pay))), end-int64(off)))
			q.start(e, false, int64(off), size)
		case size > psz:
			q.commit(e, 0, syscall.EINVAL)
		case int64(off)+int64(size) > end:
			q.commit(e, 0, syscall.ENOSPC)
		default:
			q.start(e, true, int64(off), size)
		}
		return
	}
	// Everything else: the request's first argument is in op_in; a name
	// (LOOKUP) is in the payload.
	body := opIn
	if opcode == opLookup {
		body = e.pay[:psz]
	}
	n, errno, _ := q.sync.dispatch(opcode, nodeid, body)
	if errno != 0 {
		n = 0
	}
	copy(e.pay, q.sync.out[outHeaderSize:outHeaderSize+n])
	q.commit(e, n, errno)
}

// start hands the READ or WRITE in e to the file: the data is read into, or
// written from, the entry's payload buffer itself.
func (q *uringQueue) start(e *ringEnt, write bool, off int64, size int) {
	op := &e.op
	op.Buf = e.pay[:size:size]
	op.Off, op.Write, op.unique = off, write, e.unique
	q.inflight++
	q.q.Submit(op)
}

// reply commits the answer of the file's I/O for e's request (opOwner).
func (e *ringEnt) reply(op *Op, n int, errno syscall.Errno) {
	q := e.q
	q.inflight--
	switch {
	case errno != 0:
		q.commit(e, 0, errno)
	case op.Write:
		le.PutUint32(e.pay[0:], uint32(min(max(n, 0), len(op.Buf))))
		le.PutUint32(e.pay[4:], 0)
		q.commit(e, writeOutSize, 0)
	default:
		q.commit(e, min(max(n, 0), len(op.Buf)), 0)
	}
	op.Buf = nil
}

// commit writes the reply header (n payload bytes already in e.pay, or
// errno) and prepares COMMIT_AND_FETCH, which hands the reply over and
// re-arms the entry.
func (q *uringQueue) commit(e *ringEnt, n int, errno syscall.Errno) {
	if errno != 0 {
		q.as.s.stats.Errors.Add(1)
		n = 0
	}
	putOutHeader(e.hdr, outHeaderSize+n, -int32(errno), e.unique)
	le.PutUint32(e.hdr[ringHdrEntIO+16:], uint32(n))
	if err := q.command(e, uringCmdCommitAndFetch); err != nil {
		// The ring refused a command: the entry is lost to this queue.
		q.as.s.stats.ReplyFailures.Add(1)
		e.ended = true
		q.live--
	}
}
