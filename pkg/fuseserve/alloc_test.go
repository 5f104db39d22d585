package fuseserve

import (
	"os"
	"testing"
)

// TestNoAllocationPerRequest serves requests built in a reader's buffer, with
// the replies going to /dev/null: the hot path allocates nothing.
func TestNoAllocationPerRequest(t *testing.T) {
	null, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	m := &memFile{data: make([]byte, 4<<20)}
	m.size.Store(4 << 20)
	sess := &Session{Major: 7, Minor: 45, MaxWrite: 1 << 20, MaxPages: 256}
	s := &server{fd: int(null.Fd()), sess: sess, file: m, stats: &Stats{}}
	r := newReader(s)
	build := func(opcode uint32, nodeid uint64, body []byte) int {
		n := inHeaderSize + len(body)
		le.PutUint32(r.in[0:], uint32(n))
		le.PutUint32(r.in[4:], opcode)
		le.PutUint64(r.in[8:], 2|uniqueResend)
		le.PutUint64(r.in[16:], nodeid)
		copy(r.in[inHeaderSize:], body)
		return n
	}
	rw := make([]byte, readInSize+4096)
	le.PutUint64(rw[8:], 8192)  // offset
	le.PutUint32(rw[16:], 4096) // size
	for _, tc := range []struct {
		name   string
		opcode uint32
		nodeid uint64
		body   []byte
	}{
		{"read", opRead, fileNodeID, rw[:readInSize]},
		{"write", opWrite, fileNodeID, rw},
		{"getattr", opGetattr, fileNodeID, make([]byte, 16)},
		{"lookup", opLookup, rootNodeID, []byte(FileName + "\x00")},
		{"fsync", opFsync, fileNodeID, make([]byte, fsyncInSize)},
		{"unknown", 999, fileNodeID, nil},
	} {
		n := build(tc.opcode, tc.nodeid, tc.body)
		allocs := testing.AllocsPerRun(200, func() {
			if err := r.handle(n); err != nil {
				t.Fatal(err)
			}
		})
		if allocs != 0 {
			t.Errorf("%s: %.1f allocations per request", tc.name, allocs)
		}
	}
	if s.stats.ReplyFailures.Load() != 0 || s.stats.Resent.Load() == 0 {
		t.Errorf("stats: %d reply failures, %d resent", s.stats.ReplyFailures.Load(), s.stats.Resent.Load())
	}
}
