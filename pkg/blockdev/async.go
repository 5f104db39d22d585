package blockdev

import (
	"fmt"
	"sync"
	"syscall"

	"k8s.io/klog/v2"

	"github.com/csi-encdisk/csi-encdisk/pkg/fuseserve"
)

// The engine's fast path: the FUSE server hands READs and WRITEs over as
// fuseserve.Ops (fuseserve.AsyncFile) and the engine puts them on an
// io_uring ring on the image's O_DIRECT descriptor: a WRITE is encrypted in
// place in the request buffer and queued; a READ is queued into the reply
// buffer and decrypted in place when it completes. The reader that read the
// request goes on reading; what it read in a burst is submitted in one
// io_uring_enter (Flush). One goroutine reaps completions, woken through an
// eventfd by the Go netpoller, and answers the requests. No OS thread waits
// for an image I/O, and no allocation happens per request.

var _ fuseserve.AsyncFile = (*engine)(nil)

// ringEntries bounds the image I/Os in flight: at least every buffer the
// FUSE server has (fuseserve.DefaultSmallBuffers + DefaultBigBuffers).
const ringEntries = 128

// imageRing is the engine's ring on its image.
type imageRing struct {
	r    *uring
	fd   int                        // the image's O_DIRECT descriptor
	slot [ringEntries]*fuseserve.Op // by user_data; guarded by r.mu
	free []uint32                   // free slots; guarded by r.mu
	done sync.WaitGroup             // the reaper
}

// startRing sets up the ring on f's O_DIRECT descriptor and its reaper.
func (e *engine) startRing(f *fileImage) error {
	if f.direct == nil {
		return fmt.Errorf("image not opened with O_DIRECT")
	}
	r, err := newURing(ringEntries, true)
	if err != nil {
		return err
	}
	ir := &imageRing{r: r, fd: int(f.direct.Fd()), free: make([]uint32, 0, ringEntries)}
	for i := ringEntries - 1; i >= 0; i-- {
		ir.free = append(ir.free, uint32(i))
	}
	e.ring = ir
	ir.done.Go(e.reap)
	return nil
}

// stopRing ends the reaper; no I/O may be in flight (Serve returned).
func (e *engine) stopRing() {
	if e.ring == nil {
		return
	}
	e.ring.r.ev.Close() // wakes the reaper with os.ErrClosed
	e.ring.done.Wait()
	e.ring.r.Close()
}

// Submit starts a READ or WRITE of the FUSE server (fuseserve.AsyncFile).
func (e *engine) Submit(op *fuseserve.Op) {
	if !e.aligned(op.Off, len(op.Buf)) {
		op.Complete(0, syscall.EINVAL)
		return
	}
	if op.Write {
		if op.Off+int64(len(op.Buf)) > e.size.Load() {
			op.Complete(0, syscall.ENOSPC)
			return
		}
		e.xts.EncryptSectors(op.Buf, op.Buf, uint64(op.Off)/512)
	} else {
		size := e.size.Load()
		if op.Off >= size {
			op.Complete(0, 0)
			return
		}
		op.Buf = op.Buf[:min(int64(len(op.Buf)), size-op.Off)]
	}
	ir := e.ring
	code := uint8(uringOpRead)
	if op.Write {
		code = uringOpWrite
	}
	ir.r.mu.Lock()
	if len(ir.free) == 0 {
		// Cannot happen: ringEntries covers every buffer of the server.
		ir.r.mu.Unlock()
		e.ioFailed(op, syscall.EBUSY)
		return
	}
	i := ir.free[len(ir.free)-1]
	err := ir.r.queueLocked(code, ir.fd, op.Buf, e.dataOffset+op.Off, uint64(i))
	if err == errRingFull {
		// Queued SQEs the kernel has not consumed yet: hand them on.
		if err = ir.r.submitLocked(); err == nil {
			err = ir.r.queueLocked(code, ir.fd, op.Buf, e.dataOffset+op.Off, uint64(i))
		}
	}
	if err != nil {
		ir.r.mu.Unlock()
		e.ioFailed(op, err)
		return
	}
	ir.free = ir.free[:len(ir.free)-1]
	ir.slot[i] = op
	ir.r.mu.Unlock()
}

// Flush submits what Submit queued (fuseserve.AsyncFile).
func (e *engine) Flush() {
	ir := e.ring
	ir.r.mu.Lock()
	err := ir.r.submitLocked()
	ir.r.mu.Unlock()
	if err != nil {
		klog.ErrorS(err, "io_uring submission failed", "volumeID", e.spec.VolumeID)
	}
}

// reap answers completed image I/Os until the ring's eventfd is closed.
func (e *engine) reap() {
	ir := e.ring
	for {
		if err := ir.r.waitEvent(); err != nil {
			return
		}
		ir.r.reap(e.completeFn)
	}
}

// complete finishes the image I/O of slot u with result res.
func (e *engine) complete(u uint64, res int32) {
	ir := e.ring
	ir.r.mu.Lock()
	op := ir.slot[u]
	ir.slot[u] = nil
	ir.free = append(ir.free, uint32(u))
	ir.r.mu.Unlock()
	if op == nil {
		return
	}
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
