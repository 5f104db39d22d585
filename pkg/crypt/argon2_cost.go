package crypt

import (
	"errors"
	"fmt"
	"runtime"
	"time"

	"golang.org/x/crypto/argon2"
	"golang.org/x/sys/unix"
)

// Argon2Params is the cost of an argon2id keyslot, as LUKS2 stores it.
type Argon2Params struct {
	Time      int // passes (cryptsetup's minimum is 4)
	MemoryKiB int // 32 MiB to 4 GiB
	Threads   int // 1 to 4 (cryptsetup's maximum)
}

// Cryptsetup's limits and defaults for argon2 keyslots (lib/libcryptsetup.h,
// lib/utils_pbkdf.c): 2 s per unlock, at most 1 GiB, at most half of the
// physical memory, 4 threads (no more than the CPUs), at least 4 passes
// and 32 MiB.
const (
	DefaultArgon2Target    = 2 * time.Second
	DefaultArgon2MaxMemory = 1 << 20 // KiB: 1 GiB
	minArgon2Time          = 4
	minArgon2MemoryKiB     = 32 << 10
	maxArgon2Threads       = 4
)

func (p Argon2Params) check() error {
	switch {
	case p.Time < minArgon2Time || p.Time > 1<<20:
		return fmt.Errorf("crypt: argon2id time cost %d: want 4 or more", p.Time)
	case p.MemoryKiB < minArgon2MemoryKiB || p.MemoryKiB > 4<<20:
		return fmt.Errorf("crypt: argon2id memory %d KiB: want 32 MiB to 4 GiB", p.MemoryKiB)
	case p.Threads < 1 || p.Threads > maxArgon2Threads:
		return fmt.Errorf("crypt: argon2id threads %d: want 1 to 4", p.Threads)
	}
	return nil
}

// MeasureArgon2id picks an argon2id cost the way cryptsetup does for a
// passphrase keyslot: memory min(maxMemoryKiB, half the physical memory),
// threads min(4, CPUs), then as many passes as fit in target on this
// machine (at least 4; when 4 passes at that memory take longer than
// target, the memory shrinks instead, down to 32 MiB). It runs the KDF a
// few times, so it takes about target/2.
func MeasureArgon2id(target time.Duration, maxMemoryKiB int) (Argon2Params, error) {
	if target <= 0 || maxMemoryKiB < minArgon2MemoryKiB {
		return Argon2Params{}, errors.New("crypt: argon2id target must be positive and the memory at least 32 MiB")
	}
	mem := maxMemoryKiB
	var si unix.Sysinfo_t
	if err := unix.Sysinfo(&si); err == nil {
		if half := int(uint64(si.Totalram) * uint64(si.Unit) / 2 / 1024); half > 0 && half < mem {
			mem = max(half, minArgon2MemoryKiB)
		}
	}
	threads := min(maxArgon2Threads, runtime.NumCPU())
	salt := make([]byte, 32)
	// One pass at the chosen memory, timed (memory dominates; passes scale
	// the time linearly).
	start := time.Now()
	k := argon2.IDKey([]byte("benchmark"), salt, 1, uint32(mem), uint8(threads), 32)
	clear(k)
	perPass := max(time.Since(start), time.Microsecond)
	passes := int(target / perPass)
	if passes < minArgon2Time {
		// Shrink the memory so that 4 passes fit in the target.
		mem = max(minArgon2MemoryKiB, int(int64(mem)*int64(passes+1)/minArgon2Time))
		passes = minArgon2Time
	}
	p := Argon2Params{Time: passes, MemoryKiB: mem, Threads: threads}
	return p, p.check()
}
