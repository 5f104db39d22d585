// Package keyedlock provides a mutex per key: calls that lock the same key
// run one at a time, calls on different keys run in parallel, and a wait
// ends when its context does.
package keyedlock

import (
	"context"
	"errors"
	"fmt"
	"sync"
)

// ErrBusy is wrapped by the error of a Lock whose context ended while
// another holder had the key. The error also wraps the context's error.
var ErrBusy = errors.New("another operation holds the lock")

// Locks is a set of keyed mutexes. The zero value is not usable; call New.
// An entry exists only while a key is held or waited for.
type Locks struct {
	mu   sync.Mutex
	keys map[string]*entry
}

// entry is one key's mutex: a one-slot channel (full = held) and the number
// of holders plus waiters, which decides when the entry is dropped.
type entry struct {
	slot chan struct{}
	refs int
}

// New returns an empty set of locks.
func New() *Locks {
	return &Locks{keys: map[string]*entry{}}
}

// Lock waits until key is free or ctx ends. On success it returns the
// function that releases the key (calling it more than once is harmless).
// When ctx ends first, the error wraps both ErrBusy and ctx.Err(); a ctx
// that has already ended never gets the lock.
func (l *Locks) Lock(ctx context.Context, key string) (unlock func(), err error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("lock %q: %w: %w", key, ErrBusy, err)
	}
	l.mu.Lock()
	e, ok := l.keys[key]
	if !ok {
		e = &entry{slot: make(chan struct{}, 1)}
		l.keys[key] = e
	}
	e.refs++
	l.mu.Unlock()

	select {
	case e.slot <- struct{}{}:
	case <-ctx.Done():
		l.release(key, e)
		return nil, fmt.Errorf("lock %q: %w: %w", key, ErrBusy, ctx.Err())
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			<-e.slot
			l.release(key, e)
		})
	}, nil
}

// release drops one reference to e and forgets the key with the last one.
func (l *Locks) release(key string, e *entry) {
	l.mu.Lock()
	defer l.mu.Unlock()
	e.refs--
	if e.refs == 0 {
		delete(l.keys, key)
	}
}

// len returns the number of keys held or waited for (for tests).
func (l *Locks) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.keys)
}
