package blockdev

import (
	"sync"
	"unsafe"
)

// bufAlign is the alignment of pooled buffers: O_DIRECT on the image wants
// buffers aligned to the backing device's logical block size (at most 4096).
const bufAlign = 4096

// chunkSize is the largest piece of a request handled with one pooled buffer;
// it matches the FUSE MaxWrite so a request normally needs one buffer.
const chunkSize = 1 << 20

// bufPool hands out reusable chunkSize buffers aligned to bufAlign, so the hot
// path neither allocates nor faults in fresh (mlocked) memory per request.
type bufPool struct{ p sync.Pool }

func newBufPool() *bufPool {
	bp := &bufPool{}
	bp.p.New = func() any {
		raw := make([]byte, chunkSize+bufAlign)
		off := 0
		if r := int(uintptr(unsafe.Pointer(&raw[0])) % bufAlign); r != 0 {
			off = bufAlign - r
		}
		b := raw[off : off+chunkSize : off+chunkSize]
		return &b
	}
	return bp
}

func (bp *bufPool) get() *[]byte  { return bp.p.Get().(*[]byte) }
func (bp *bufPool) put(b *[]byte) { bp.p.Put(b) }
