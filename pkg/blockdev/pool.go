package blockdev

import "unsafe"

// bufAlign is the alignment of pooled buffers: O_DIRECT on the image wants
// buffers aligned to the backing device's logical block size (at most 4096).
const bufAlign = 4096

// chunkSize is the largest piece of a request handled with one pooled buffer;
// it matches the FUSE MaxWrite so a request normally needs one buffer.
const chunkSize = 1 << 20

// poolBuffers is how many chunk buffers an engine preallocates: requests
// beyond that many at once wait for a buffer instead of allocating.
const poolBuffers = 16

// bufPool is a fixed free list of chunkSize buffers aligned to bufAlign, cut
// from one slab made at start (and mlocked with the rest of the engine). The
// engine sits in the block I/O path, so it must not allocate while serving
// a request: memory pressure may be what the request is there to relieve.
// A sync.Pool would not do: the garbage collector empties it.
type bufPool struct{ free chan *[]byte }

func newBufPool() *bufPool {
	slab := make([]byte, poolBuffers*chunkSize+bufAlign)
	off := 0
	if r := int(uintptr(unsafe.Pointer(&slab[0])) % bufAlign); r != 0 {
		off = bufAlign - r
	}
	bp := &bufPool{free: make(chan *[]byte, poolBuffers)}
	for i := 0; i < poolBuffers; i++ {
		b := slab[off+i*chunkSize : off+(i+1)*chunkSize : off+(i+1)*chunkSize]
		bp.free <- &b
	}
	return bp
}

// get takes a buffer, waiting while all are in use.
func (bp *bufPool) get() *[]byte { return <-bp.free }

// put returns a buffer taken with get.
func (bp *bufPool) put(b *[]byte) { bp.free <- b }
