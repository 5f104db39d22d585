package blockdev

import (
	"fmt"
	"syscall"

	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/fuseserve"
)

// The engine's fast path: the FUSE server hands READs and WRITEs over as
// fuseserve.Ops (fuseserve.AsyncFile) and the engine puts them on an
// io_uring ring on the image's O_DIRECT descriptor: a WRITE is encrypted in
// place in the request buffer and queued; a READ is queued into the reply
// buffer and decrypted in place when it completes. Every FUSE reader has a
// ring of its own on its own OS thread (imageQueue): it reads requests until
// none is left, then submits what it queued and waits, in one io_uring_enter,
// for the first of: an image I/O completing, a new request (a one-shot poll
// of its /dev/fuse descriptor in the same ring) or the server stopping. The
// ring is single-issuer with deferred task work, so completions are posted
// when that thread asks for them and wake only it: one wake-up per burst,
// no thread per image I/O, no allocation per request.

var _ fuseserve.AsyncFile = (*engine)(nil)

// ringEntries bounds one reader's image I/Os in flight plus its two polls:
// at least the reader's share of the FUSE server's buffers (all of
// fuseserve.DefaultSmallBuffers + DefaultBigBuffers, for a single reader).
const ringEntries = 128

// userData of the polls (image I/Os use their slot index).
const (
	pollWatch = ringEntries + iota
	pollStop
)

// imageQueue is one FUSE reader's ring on the image (fuseserve.Queue).
type imageQueue struct {
	e      *engine
	r      *uring
	fd     int                        // the image's O_DIRECT descriptor
	stop   int                        // the server's stop eventfd
	slot   [ringEntries]*fuseserve.Op // by user_data
	free   []uint32                   // free slots
	polled int                        // descriptor with a poll in flight, or -1
	// stopPolled: a poll of stop is in flight; stopped: it fired (stop is
	// readable for good, so it is not polled again).
	stopPolled, stopped bool
	readable            bool // a poll fired since the last Wait returned
	completeFn          func(uint64, int32)
}

// NewQueue sets up the calling reader's ring (fuseserve.AsyncFile). The
// reader's goroutine is locked to its thread, which the single-issuer ring
// is bound to.
func (e *engine) NewQueue(stop int) (fuseserve.Queue, error) {
	r, err := newURing(ringEntries, uringSetupSingleIssuer|uringSetupDeferTaskrun, false)
	if err != nil {
		// Before Linux 6.1: completions then run as task work that
		// interrupts this thread, which is also the one waiting for them.
		if r, err = newURing(ringEntries, 0, false); err != nil {
			return nil, err
		}
	}
	q := &imageQueue{e: e, r: r, fd: e.directFD, stop: stop, polled: -1, free: make([]uint32, 0, ringEntries)}
	for i := ringEntries - 1; i >= 0; i-- {
		q.free = append(q.free, uint32(i))
	}
	q.completeFn = q.complete
	return q, nil
}

// Close releases the ring (fuseserve.Queue). Polls still in flight go with it.
func (q *imageQueue) Close() { q.r.Close() }

// Submit starts a READ or WRITE of the FUSE server (fuseserve.Queue).
func (q *imageQueue) Submit(op *fuseserve.Op) {
	e := q.e
	if !e.aligned(op.Off, len(op.Buf)) {
		op.Complete(0, syscall.EINVAL)
		return
	}
	code := uint8(uringOpRead)
	if op.Write {
		if op.Off+int64(len(op.Buf)) > e.size.Load() {
			op.Complete(0, syscall.ENOSPC)
			return
		}
		e.xts.EncryptSectors(op.Buf, op.Buf, uint64(op.Off)/512)
		code = uringOpWrite
	} else {
		size := e.size.Load()
		if op.Off >= size {
			op.Complete(0, 0)
			return
		}
		op.Buf = op.Buf[:min(int64(len(op.Buf)), size-op.Off)]
	}
	if len(q.free) == 0 {
		// Cannot happen: ringEntries covers every buffer of the reader.
		e.ioFailed(op, syscall.EBUSY)
		return
	}
	i := q.free[len(q.free)-1]
	if err := q.queue(func() error {
		return q.r.queueLocked(code, q.fd, op.Buf, e.dataOffset+op.Off, uint64(i))
	}); err != nil {
		e.ioFailed(op, err)
		return
	}
	q.free = q.free[:len(q.free)-1]
	q.slot[i] = op
}

// queue runs add (which writes an SQE), handing the queued SQEs to the
// kernel first when the submission queue is full.
func (q *imageQueue) queue(add func() error) error {
	err := add()
	if err == errRingFull {
		if err = q.r.submitLocked(); err == nil {
			err = add()
		}
	}
	return err
}

// Wait submits what is queued and waits for a completion or a poll
// (fuseserve.Queue).
func (q *imageQueue) Wait(watch int) (bool, error) {
	if watch >= 0 && q.polled < 0 {
		if err := q.queue(func() error { return q.r.queuePollLocked(watch, pollWatch) }); err != nil {
			return false, fmt.Errorf("poll: %w", err)
		}
		q.polled = watch
	}
	if !q.stopPolled && !q.stopped {
		if err := q.queue(func() error { return q.r.queuePollLocked(q.stop, pollStop) }); err != nil {
			return false, fmt.Errorf("poll: %w", err)
		}
		q.stopPolled = true
	}
	q.readable = false
	if q.r.reap(q.completeFn) == 0 {
		if err := q.r.submitAndWait(); err != nil {
			return false, err
		}
		q.r.reap(q.completeFn)
	}
	return q.readable || q.stopped, nil
}

// complete handles one completion: a poll, or the image I/O of a slot.
func (q *imageQueue) complete(u uint64, res int32) {
	switch u {
	case pollWatch:
		q.polled = -1
		q.readable = true
		return
	case pollStop:
		q.stopPolled = false
		q.stopped = true
		return
	}
	if u >= ringEntries {
		return
	}
	op := q.slot[u]
	q.slot[u] = nil
	q.free = append(q.free, uint32(u))
	if op != nil {
		q.e.finish(op, res)
	}
}

// finish completes op, whose image I/O ended with res.
func (e *engine) finish(op *fuseserve.Op, res int32) {
	if res < 0 || int(res) != len(op.Buf) {
		// O_DIRECT refused (EINVAL), a short transfer, or an error: the
		// descriptor-level path decides (buffered fallback, EIO, the errno).
		var err error
		if op.Write {
			_, err = e.img.WriteAt(op.Buf, e.dataOffset+op.Off)
		} else {
			_, err = e.img.ReadAt(op.Buf, e.dataOffset+op.Off)
		}
		if err != nil {
			e.ioFailed(op, err)
			return
		}
	}
	n := len(op.Buf)
	if op.Write {
		e.writeOps.Add(1)
		e.writeBytes.Add(uint64(n))
	} else {
		e.decrypt(op.Buf, op.Off)
		e.readOps.Add(1)
		e.readBytes.Add(uint64(n))
	}
	op.Complete(n, 0)
}

func (e *engine) ioFailed(op *fuseserve.Op, err error) {
	e.ioErrors.Add(1)
	what := "Image read failed"
	if op.Write {
		what = "Image write failed"
	}
	klog.ErrorS(err, what, "volumeID", e.spec.VolumeID, "offset", op.Off, "length", len(op.Buf))
	op.Complete(0, ioErrno(err))
}
