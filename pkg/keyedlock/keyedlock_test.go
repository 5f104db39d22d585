package keyedlock

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestSerialisesOneKey(t *testing.T) {
	l := New()
	var inside, maxInside, total atomic.Int32
	var wg sync.WaitGroup
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			unlock, err := l.Lock(context.Background(), "vol")
			if err != nil {
				t.Error(err)
				return
			}
			n := inside.Add(1)
			for {
				m := maxInside.Load()
				if n <= m || maxInside.CompareAndSwap(m, n) {
					break
				}
			}
			time.Sleep(time.Millisecond)
			total.Add(1)
			inside.Add(-1)
			unlock()
		}()
	}
	wg.Wait()
	if maxInside.Load() != 1 {
		t.Fatalf("%d holders of one key at once, want 1", maxInside.Load())
	}
	if total.Load() != 20 {
		t.Fatalf("%d of 20 got the lock", total.Load())
	}
	if n := l.len(); n != 0 {
		t.Fatalf("%d map entries left after all unlocked", n)
	}
}

func TestDifferentKeysRunInParallel(t *testing.T) {
	l := New()
	unlockA, err := l.Lock(context.Background(), "a")
	if err != nil {
		t.Fatal(err)
	}
	defer unlockA()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	unlockB, err := l.Lock(ctx, "b") // must not wait for "a"
	if err != nil {
		t.Fatalf("lock of another key while one is held: %v", err)
	}
	unlockB()
}

func TestWaitEndsWithContext(t *testing.T) {
	l := New()
	unlock, err := l.Lock(context.Background(), "vol")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = l.Lock(ctx, "vol")
	if !errors.Is(err, ErrBusy) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v, want an error wrapping ErrBusy and context.DeadlineExceeded", err)
	}
	if time.Since(start) > 2*time.Second {
		t.Fatal("the wait did not end with its context")
	}

	cctx, ccancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, err := l.Lock(cctx, "vol")
		errc <- err
	}()
	time.Sleep(20 * time.Millisecond)
	ccancel()
	if err := <-errc; !errors.Is(err, ErrBusy) || !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want an error wrapping ErrBusy and context.Canceled", err)
	}
	if n := l.len(); n != 1 {
		t.Fatalf("%d map entries while one key is held and nobody waits, want 1", n)
	}

	// The holder is not disturbed by the abandoned waits; after unlock the
	// key is free and its entry gone.
	unlock()
	unlock() // twice is harmless
	if n := l.len(); n != 0 {
		t.Fatalf("%d map entries left, want 0", n)
	}
	u, err := l.Lock(context.Background(), "vol")
	if err != nil {
		t.Fatal(err)
	}
	u()
}

func TestEndedContextNeverGetsTheLock(t *testing.T) {
	l := New()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := l.Lock(ctx, "free"); !errors.Is(err, context.Canceled) || !errors.Is(err, ErrBusy) {
		t.Fatalf("got %v, want ErrBusy and context.Canceled", err)
	}
	if n := l.len(); n != 0 {
		t.Fatalf("%d map entries left, want 0", n)
	}
}

func TestWaiterGetsTheLockAfterUnlock(t *testing.T) {
	l := New()
	unlock, err := l.Lock(context.Background(), "k")
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan func(), 1)
	go func() {
		u, err := l.Lock(context.Background(), "k")
		if err != nil {
			t.Error(err)
		}
		got <- u
	}()
	select {
	case <-got:
		t.Fatal("a waiter got a held lock")
	case <-time.After(30 * time.Millisecond):
	}
	unlock()
	select {
	case u := <-got:
		u()
	case <-time.After(5 * time.Second):
		t.Fatal("the waiter did not get the lock after unlock")
	}
	if n := l.len(); n != 0 {
		t.Fatalf("%d map entries left, want 0", n)
	}
}
