package fuseserve

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestReplayOfOverlappingWrites has two overlapping writes (through a loop
// device) in flight when
// the server dies: A = [0, 64K) reached the memory, B = [32K, 96K) did not.
// A new server resends both. Both writes then complete; every sector holds
// the data of a write that covered it (in the overlap, per sector, A or B:
// both were in flight together, so either order is valid), nothing else
// changed, and a write issued after their completion is not undone by any
// late replay.
func TestReplayOfOverlappingWrites(t *testing.T) {
	const (
		k    = 1024
		size = 1 << 20
	)
	s := newSupervisor(t, size)
	fill := func(c byte, n int) []byte {
		b := aligned(n)
		for i := range b {
			b[i] = c
		}
		return b
	}
	// Z under everything, straight into the backing memory.
	if _, err := s.mem.WriteAt(fill('Z', 128*k), 0); err != nil {
		t.Fatal(err)
	}
	s.start(false, "FUSESERVE_HANG_APPLY="+strconv.Itoa(0), "FUSESERVE_HANG_BEFORE="+strconv.Itoa(32*k))

	// Through a loop device, as the engine is used: its requests reach the
	// server as asynchronous direct I/O.
	loop := loopAttach(t, filepath.Join(s.dir, FileName))
	loopAttached := true
	defer func() {
		if loopAttached {
			loopDetach(t, loop)
		}
	}()
	f, err := os.OpenFile(loop, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	type result struct {
		n   int
		err error
	}
	write := func(c byte, off int64) <-chan result {
		ch := make(chan result, 1)
		go func() {
			n, err := f.WriteAt(fill(c, 64*k), off)
			ch <- result{n, err}
		}()
		return ch
	}
	a := write('A', 0)
	b := write('B', 32*k)
	// Both requests are now in the server, which stopped in them.
	_ = s.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	var hung [2]byte
	if _, err := io.ReadFull(s.conn, hung[:]); err != nil {
		t.Fatalf("server did not stop in both writes: %v", err)
	}
	mem := make([]byte, 128*k)
	if _, err := s.mem.ReadAt(mem, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(mem[:64*k], fill('A', 64*k)) || !bytes.Equal(mem[64*k:], fill('Z', 64*k)) {
		t.Fatal("before the kill: want A applied and B not")
	}
	s.kill()
	time.Sleep(300 * time.Millisecond)
	select {
	case r := <-a:
		t.Fatalf("write A returned without a server: %+v", r)
	case r := <-b:
		t.Fatalf("write B returned without a server: %+v", r)
	default:
	}
	s.start(true)
	for name, ch := range map[string]<-chan result{"A": a, "B": b} {
		select {
		case r := <-ch:
			if r.err != nil || r.n != 64*k {
				t.Errorf("write %s after takeover: %d %v", name, r.n, r.err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("write %s did not complete after takeover", name)
		}
	}
	got := aligned(128 * k)
	if _, err := f.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:32*k], fill('A', 32*k)) {
		t.Error("[0, 32K) is not A")
	}
	if !bytes.Equal(got[64*k:96*k], fill('B', 32*k)) {
		t.Error("[64K, 96K) is not B")
	}
	if !bytes.Equal(got[96*k:], fill('Z', 32*k)) {
		t.Error("[96K, 128K) changed")
	}
	var overlap []byte
	for sec := 32 * k; sec < 64*k; sec += 4 * k {
		c := got[sec]
		if (c != 'A' && c != 'B') || !bytes.Equal(got[sec:sec+4*k], fill(c, 4*k)) {
			t.Errorf("sector at %d is neither all A nor all B", sec)
		}
		overlap = append(overlap, c)
	}
	// A write after both completed stays, whatever else the kernel had queued.
	if n, err := f.WriteAt(fill('C', 32*k), 32*k); err != nil || n != 32*k {
		t.Fatalf("write C: %d %v", n, err)
	}
	time.Sleep(300 * time.Millisecond)
	if _, err := f.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[32*k:64*k], fill('C', 32*k)) {
		t.Error("a later write was undone")
	}
	f.Close()
	loopDetach(t, loop)
	loopAttached = false
	s.unmount()
	res := s.result()
	if res.Resent < 2 {
		t.Errorf("new server saw %d resent requests, want the 2 writes", res.Resent)
	}
	t.Logf("overlap sectors after replay: %s; new server: %d requests, %d resent", overlap, res.Requests, res.Resent)
}
