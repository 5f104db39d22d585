package blockdev

import (
	"syscall"

	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/fuseserve"
	"github.com/csi-encdisk/csi-encdisk/pkg/uring"
)

// The engine's fast path: the FUSE server hands READs and WRITEs over as
// fuseserve.Ops (fuseserve.AsyncFile) and the engine prepares them on the
// io_uring ring of the server thread that read them, on the image's
// O_DIRECT descriptor: a WRITE is encrypted in place in the request buffer
// and queued; a READ is queued into the reply buffer and decrypted in place
// when it completes. The server thread submits them with its next wait,
// which also waits for new requests (fuseserve.AsyncFile says how): one
// thread per FUSE reader does all the work of its requests, one wake-up
// per burst, no thread per image I/O, no allocation per request.

var _ fuseserve.AsyncFile = (*engine)(nil)

// imageQueue is one server thread's image I/O (fuseserve.Queue).
type imageQueue struct {
	e    *engine
	r    *uring.Ring
	fd   int             // the image's O_DIRECT descriptor
	slot []*fuseserve.Op // by user data
	free []uint32        // free slots
}

// NewQueue makes the image I/O queue of a server thread on its ring
// (fuseserve.AsyncFile).
func (e *engine) NewQueue(r *uring.Ring) (fuseserve.Queue, error) {
	n := r.Entries()
	q := &imageQueue{e: e, r: r, fd: e.directFD, slot: make([]*fuseserve.Op, n), free: make([]uint32, 0, n)}
	for i := int(n) - 1; i >= 0; i-- {
		q.free = append(q.free, uint32(i))
	}
	return q, nil
}

// Close does nothing: the ring is the server's (fuseserve.Queue).
func (q *imageQueue) Close() {}

// Submit prepares a READ or WRITE of the FUSE server (fuseserve.Queue).
func (q *imageQueue) Submit(op *fuseserve.Op) {
	e := q.e
	if !e.aligned(op.Off, len(op.Buf)) {
		op.Complete(0, syscall.EINVAL)
		return
	}
	prep := q.r.PrepRead
	if op.Write {
		if op.Off+int64(len(op.Buf)) > e.size.Load() {
			op.Complete(0, syscall.ENOSPC)
			return
		}
		e.xts.EncryptSectors(op.Buf, op.Buf, uint64(op.Off)/512)
		prep = q.r.PrepWrite
	} else {
		size := e.size.Load()
		if op.Off >= size {
			op.Complete(0, 0)
			return
		}
		op.Buf = op.Buf[:min(int64(len(op.Buf)), size-op.Off)]
	}
	if len(q.free) == 0 {
		// Cannot happen: the ring has an entry for every buffer of the
		// server thread.
		e.ioFailed(op, syscall.EBUSY)
		return
	}
	i := q.free[len(q.free)-1]
	err := prep(q.fd, op.Buf, e.dataOffset+op.Off, uint64(i))
	if err == uring.ErrFull {
		if err = q.r.Submit(); err == nil {
			err = prep(q.fd, op.Buf, e.dataOffset+op.Off, uint64(i))
		}
	}
	if err != nil {
		e.ioFailed(op, err)
		return
	}
	q.free = q.free[:len(q.free)-1]
	q.slot[i] = op
}

// Complete finishes the image I/O of slot u with result res
// (fuseserve.Queue).
func (q *imageQueue) Complete(u uint64, res int32) {
	if u >= uint64(len(q.slot)) {
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
