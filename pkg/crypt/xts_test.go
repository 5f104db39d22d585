package crypt

import (
	"bufio"
	"bytes"
	"crypto/aes"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
	"testing"

	"golang.org/x/crypto/xts"
)

// forEachImpl runs f once per implementation this machine supports.
func xtsForEachImpl(t *testing.T, f func(t *testing.T, impl xtsImpl)) {
	t.Helper()
	for _, impl := range supportedImpls() {
		t.Run(impl.String(), func(t *testing.T) { f(t, impl) })
	}
}

func xtsMust(t testing.TB, key []byte, sectorSize int, impl xtsImpl) *XTS {
	t.Helper()
	x, err := newXTSImpl(key, sectorSize, impl)
	if err != nil {
		t.Fatalf("newXTSImpl(%d-byte key, %d, %v): %v", len(key), sectorSize, impl, err)
	}
	return x
}

type ieeeVector struct {
	name        string
	key, pt, ct []byte
	tweak       uint64
}

// loadIEEEVectors reads testdata/xts_ieee1619.txt.
func loadIEEEVectors(t *testing.T) []ieeeVector {
	t.Helper()
	f, err := os.Open("testdata/xts_ieee1619.txt")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var vs []ieeeVector
	var cur *ieeeVector
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, " = ")
		if !ok {
			t.Fatalf("bad line %q", line)
		}
		if k == "vector" {
			vs = append(vs, ieeeVector{name: v})
			cur = &vs[len(vs)-1]
			continue
		}
		b, err := hex.DecodeString(v)
		if err != nil {
			t.Fatalf("vector %s %s: %v", cur.name, k, err)
		}
		switch k {
		case "key":
			cur.key = b
		case "tweak":
			if len(b) != 16 || !bytes.Equal(b[8:], make([]byte, 8)) {
				t.Fatalf("vector %s: tweak %x does not fit 64 bits", cur.name, b)
			}
			cur.tweak = binary.LittleEndian.Uint64(b)
		case "plaintext":
			cur.pt = b
		case "ciphertext":
			cur.ct = b
		default:
			t.Fatalf("unknown field %q", k)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return vs
}

func TestXTSImplementationsDetected(t *testing.T) {
	impls := supportedImpls()
	t.Logf("implementations on this machine: %v (NewXTS uses %v)", impls, bestImpl())
	if impls[0] != implGeneric {
		t.Fatalf("generic implementation missing from %v", impls)
	}
	want := expectedImpls()
	for _, w := range want {
		if !implSupported(w) {
			t.Errorf("CPU advertises the features of %v but it is not offered (have %v)", w, impls)
		}
	}
	if bestImpl() != impls[len(impls)-1] {
		t.Errorf("bestImpl %v is not the fastest supported of %v", bestImpl(), impls)
	}
}

func TestXTSIEEE1619Vectors(t *testing.T) {
	vs := loadIEEEVectors(t)
	n256 := 0
	for _, v := range vs {
		if len(v.key) == 64 {
			n256++
		}
	}
	if len(vs) < 15 || n256 < 5 {
		t.Fatalf("want vectors 1-14 and 19 (5 of them AES-256), loaded %d (%d AES-256)", len(vs), n256)
	}
	xtsForEachImpl(t, func(t *testing.T, impl xtsImpl) {
		for _, v := range vs {
			half := len(v.key) / 2
			var x *XTS
			if bytes.Equal(v.key[:half], v.key[half:]) {
				if _, err := newXTSImpl(v.key, 512, impl); err == nil {
					t.Fatalf("vector %s: key with equal halves accepted", v.name)
				}
				var err error
				if x, err = buildXTS(v.key, 512, impl); err != nil {
					t.Fatal(err)
				}
			} else {
				x = xtsMust(t, v.key, 512, impl)
			}
			got := make([]byte, len(v.pt))
			x.cryptUnit(got, v.pt, v.tweak, false)
			if !bytes.Equal(got, v.ct) {
				t.Errorf("vector %s: encrypt mismatch\n got %x\nwant %x", v.name, got, v.ct)
			}
			x.cryptUnit(got, v.ct, v.tweak, true)
			if !bytes.Equal(got, v.pt) {
				t.Errorf("vector %s: decrypt mismatch", v.name)
			}
			if len(v.pt) != 512 {
				continue
			}
			// The same vector through the public sector API: a
			// 512-byte sector whose position is the tweak.
			x.EncryptSectors(got, v.pt, v.tweak)
			if !bytes.Equal(got, v.ct) {
				t.Errorf("vector %s: EncryptSectors mismatch", v.name)
			}
			x.DecryptSectors(got, v.ct, v.tweak)
			if !bytes.Equal(got, v.pt) {
				t.Errorf("vector %s: DecryptSectors mismatch", v.name)
			}
		}
	})
}

// xcryptoSectors is the reference: golang.org/x/crypto/xts, one data unit per
// sector, tweak = position in 512-byte units.
func xcryptoSectors(t testing.TB, key, src []byte, sectorSize int, first uint64, decrypt bool) []byte {
	t.Helper()
	c, err := xts.NewCipher(aes.NewCipher, key)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]byte, len(src))
	for off := 0; off < len(src); off += sectorSize {
		sec := first + uint64(off/512)
		if decrypt {
			c.Decrypt(out[off:off+sectorSize], src[off:off+sectorSize], sec)
		} else {
			c.Encrypt(out[off:off+sectorSize], src[off:off+sectorSize], sec)
		}
	}
	return out
}

func xtsRandKey(r *rand.Rand, n int) []byte {
	k := make([]byte, n)
	for i := range k {
		k[i] = byte(r.Uint32())
	}
	return k
}

func xtsRandBytes(r *rand.Rand, n int) []byte { return xtsRandKey(r, n) }

// randomSector picks a first sector aligned to step, often near interesting
// boundaries (0, 2^32, 2^64) so that tweak carries are exercised.
func xtsRandSector(r *rand.Rand, step uint64) uint64 {
	var s uint64
	switch r.IntN(4) {
	case 0:
		s = r.Uint64N(1 << 20)
	case 1:
		s = 1<<32 - r.Uint64N(64)
	case 2:
		s = -r.Uint64N(128) // just below 2^64: the tweak wraps like plain64
	default:
		s = r.Uint64()
	}
	return s &^ (step - 1)
}

func TestXTSCrossCheckXCrypto(t *testing.T) {
	xtsForEachImpl(t, func(t *testing.T, impl xtsImpl) {
		r := rand.New(rand.NewPCG(1, uint64(impl)))
		for i := 0; i < 120; i++ {
			keyLen := []int{32, 64}[i%2]
			sectorSize := []int{512, 4096}[(i/2)%2]
			key := xtsRandKey(r, keyLen)
			x := xtsMust(t, key, sectorSize, impl)
			nsec := r.IntN(9)
			if sectorSize == 512 && r.IntN(4) == 0 {
				nsec = 32 + r.IntN(40)
			}
			first := xtsRandSector(r, uint64(sectorSize/512))
			// Odd offsets: the engine must not need aligned buffers.
			so, do := r.IntN(16), r.IntN(16)
			src := xtsRandBytes(r, nsec*sectorSize+so)[so:]
			dst := make([]byte, nsec*sectorSize+do+16)[do:]
			want := xcryptoSectors(t, key, src, sectorSize, first, false)
			x.EncryptSectors(dst, src, first)
			if !bytes.Equal(dst[:len(src)], want) {
				t.Fatalf("case %d (key %d, sector %d, %d sectors, first %d): encrypt differs from x/crypto/xts",
					i, keyLen, sectorSize, nsec, first)
			}
			if !bytes.Equal(dst[len(src):], make([]byte, 16)) {
				t.Fatalf("case %d: wrote past len(src)", i)
			}
			back := make([]byte, len(src))
			x.DecryptSectors(back, dst[:len(src)], first)
			if !bytes.Equal(back, src) {
				t.Fatalf("case %d: decrypt does not invert encrypt", i)
			}
			wantDec := xcryptoSectors(t, key, src, sectorSize, first, true)
			x.DecryptSectors(back, src, first)
			if !bytes.Equal(back, wantDec) {
				t.Fatalf("case %d: decrypt differs from x/crypto/xts", i)
			}
		}
		// Data units of every block count from 1 to 70, to cover each
		// tail length of the wide loops.
		for nb := 1; nb <= 70; nb++ {
			key := xtsRandKey(r, 64)
			x := xtsMust(t, key, 512, impl)
			src := xtsRandBytes(r, nb*16)
			tw := r.Uint64()
			c, _ := xts.NewCipher(aes.NewCipher, key)
			want := make([]byte, len(src))
			c.Encrypt(want, src, tw)
			got := make([]byte, len(src))
			x.cryptUnit(got, src, tw, false)
			if !bytes.Equal(got, want) {
				t.Fatalf("%d-block unit: encrypt differs from x/crypto/xts", nb)
			}
			x.cryptUnit(got, got, tw, true)
			if !bytes.Equal(got, src) {
				t.Fatalf("%d-block unit: decrypt does not invert", nb)
			}
		}
	})
}

// TestXTSPlain64Convention pins the IV rule of LUKS2 (plain64 without
// iv_large_sectors): the second 4096-byte sector of a buffer has tweak 8.
func TestXTSPlain64Convention(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 7))
	key := xtsRandKey(r, 64)
	src := xtsRandBytes(r, 2*4096)
	xtsForEachImpl(t, func(t *testing.T, impl xtsImpl) {
		x := xtsMust(t, key, 4096, impl)
		all := make([]byte, len(src))
		x.EncryptSectors(all, src, 0)
		second := make([]byte, 4096)
		x.EncryptSectors(second, src[4096:], 8)
		if !bytes.Equal(all[4096:], second) {
			t.Fatal("sector 2 of a buffer at 0 differs from the same data at firstSector 8")
		}
		unit := make([]byte, 4096)
		x.cryptUnit(unit, src[4096:], 8, false)
		if !bytes.Equal(unit, second) {
			t.Fatal("the tweak of the 4096-byte sector at 512-byte position 8 is not 8")
		}
	})
}

func TestXTSAllImplsAgree(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 3))
	for _, ss := range []int{512, 4096} {
		key := xtsRandKey(r, 64)
		src := xtsRandBytes(r, 16*ss)
		first := uint64(0xfffffff0) &^ uint64(ss/512-1)
		var ref []byte
		for _, impl := range supportedImpls() {
			x := xtsMust(t, key, ss, impl)
			out := make([]byte, len(src))
			x.EncryptSectors(out, src, first)
			if ref == nil {
				ref = out
			} else if !bytes.Equal(out, ref) {
				t.Errorf("sector size %d: %v disagrees with %v", ss, impl, supportedImpls()[0])
			}
		}
	}
}

func TestXTSInPlace(t *testing.T) {
	r := rand.New(rand.NewPCG(4, 4))
	xtsForEachImpl(t, func(t *testing.T, impl xtsImpl) {
		for _, ss := range []int{512, 4096} {
			key := xtsRandKey(r, 64)
			x := xtsMust(t, key, ss, impl)
			src := xtsRandBytes(r, 5*ss)
			want := make([]byte, len(src))
			x.EncryptSectors(want, src, 40)
			buf := bytes.Clone(src)
			x.EncryptSectors(buf, buf, 40)
			if !bytes.Equal(buf, want) {
				t.Fatalf("sector %d: in-place encrypt differs", ss)
			}
			x.DecryptSectors(buf, buf, 40)
			if !bytes.Equal(buf, src) {
				t.Fatalf("sector %d: in-place decrypt differs", ss)
			}
		}
	})
}

func TestXTSRejectsBadKeys(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 5))
	for _, impl := range supportedImpls() {
		for _, n := range []int{32, 64} {
			half := xtsRandKey(r, n/2)
			key := append(bytes.Clone(half), half...)
			if _, err := newXTSImpl(key, 4096, impl); err == nil || !strings.Contains(err.Error(), "halves are equal") {
				t.Errorf("%v: %d-byte key with equal halves: err = %v, want refusal", impl, n, err)
			}
		}
		for _, n := range []int{0, 16, 24, 48, 65} {
			if _, err := newXTSImpl(make([]byte, n), 512, impl); err == nil || !strings.Contains(err.Error(), "32 or 64 bytes") {
				t.Errorf("%v: %d-byte key: err = %v", impl, n, err)
			}
		}
		for _, ss := range []int{0, 256, 1024, 2048, 8192} {
			if _, err := newXTSImpl(xtsRandKey(r, 64), ss, impl); err == nil || !strings.Contains(err.Error(), "512 or 4096") {
				t.Errorf("%v: sector size %d: err = %v", impl, ss, err)
			}
		}
	}
	if _, err := NewXTS(xtsRandKey(r, 64), 4096); err != nil {
		t.Fatalf("NewXTS with a good key: %v", err)
	}
}

func TestXTSPanicsOnMisuse(t *testing.T) {
	key := xtsRandKey(rand.New(rand.NewPCG(6, 6)), 64)
	xtsForEachImpl(t, func(t *testing.T, impl xtsImpl) {
		x4 := xtsMust(t, key, 4096, impl)
		x5 := xtsMust(t, key, 512, impl)
		buf := make([]byte, 3*4096)
		cases := []struct {
			name, want string
			f          func()
		}{
			{"partial sector", "multiple of the sector size", func() { x4.EncryptSectors(buf[:4000], buf[:4000], 0) }},
			{"partial 512 sector", "multiple of the sector size", func() { x5.DecryptSectors(buf[:100], buf[:100], 0) }},
			{"short dst", "output smaller", func() { x4.EncryptSectors(buf[:4096], buf[:8192], 0) }},
			{"misaligned first sector", "not aligned", func() { x4.DecryptSectors(buf[:4096], buf[:4096], 1) }},
			{"misaligned first sector 7", "not aligned", func() { x4.EncryptSectors(buf[:4096], buf[:4096], 7) }},
			{"overlap", "overlap", func() { x5.EncryptSectors(buf[16:16+1024], buf[:1024], 0) }},
		}
		for _, c := range cases {
			func() {
				defer func() {
					r := recover()
					if r == nil {
						t.Errorf("%s: no panic", c.name)
						return
					}
					if !strings.Contains(fmt.Sprint(r), c.want) {
						t.Errorf("%s: panic %q, want it to mention %q", c.name, r, c.want)
					}
				}()
				c.f()
			}()
		}
		// Empty input is fine and touches nothing.
		x4.EncryptSectors(nil, nil, 8)
		// After Wipe the keys are gone and every call panics.
		w := xtsMust(t, key, 512, impl)
		w.Wipe()
		if impl != implGeneric && w.ks != (keySchedule{}) {
			t.Error("Wipe left round keys behind")
		}
		func() {
			defer func() {
				if r := recover(); r == nil || !strings.Contains(fmt.Sprint(r), "after Wipe") {
					t.Errorf("use after Wipe: panic %v", r)
				}
			}()
			w.EncryptSectors(buf[:512], buf[:512], 0)
		}()
	})
}

func TestXTSConcurrentUse(t *testing.T) {
	r := rand.New(rand.NewPCG(8, 8))
	key := xtsRandKey(r, 64)
	xtsForEachImpl(t, func(t *testing.T, impl xtsImpl) {
		x := xtsMust(t, key, 4096, impl)
		const workers = 8
		srcs := make([][]byte, workers)
		wants := make([][]byte, workers)
		for i := range srcs {
			srcs[i] = xtsRandBytes(r, 4*4096)
			wants[i] = xcryptoSectors(t, key, srcs[i], 4096, uint64(i*64), false)
		}
		var wg sync.WaitGroup
		errs := make(chan error, workers)
		for i := 0; i < workers; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				out := make([]byte, len(srcs[i]))
				back := make([]byte, len(srcs[i]))
				for n := 0; n < 50; n++ {
					x.EncryptSectors(out, srcs[i], uint64(i*64))
					if !bytes.Equal(out, wants[i]) {
						errs <- fmt.Errorf("worker %d: wrong ciphertext under concurrency", i)
						return
					}
					x.DecryptSectors(back, out, uint64(i*64))
					if !bytes.Equal(back, srcs[i]) {
						errs <- fmt.Errorf("worker %d: wrong plaintext under concurrency", i)
						return
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	})
}

func TestXTSZeroAllocs(t *testing.T) {
	key := xtsRandKey(rand.New(rand.NewPCG(9, 9)), 64)
	xtsForEachImpl(t, func(t *testing.T, impl xtsImpl) {
		for _, ss := range []int{512, 4096} {
			x := xtsMust(t, key, ss, impl)
			buf := make([]byte, 8*ss)
			if n := testing.AllocsPerRun(100, func() { x.EncryptSectors(buf, buf, 64) }); n != 0 {
				t.Errorf("sector %d: EncryptSectors allocates %v times per call", ss, n)
			}
			if n := testing.AllocsPerRun(100, func() { x.DecryptSectors(buf, buf, 64) }); n != 0 {
				t.Errorf("sector %d: DecryptSectors allocates %v times per call", ss, n)
			}
		}
	})
}

// BenchmarkXTS measures one call per sector, as `openssl speed -bytes N`
// does (bench/xts.sh compares the two), and 64 KiB calls.
func BenchmarkXTS(b *testing.B) {
	key := xtsRandKey(rand.New(rand.NewPCG(10, 10)), 64)
	for _, impl := range supportedImpls() {
		for _, ss := range []int{512, 4096} {
			for _, size := range []int{ss, 64 << 10} {
				x := xtsMust(b, key, ss, impl)
				buf := make([]byte, size)
				for _, dir := range []string{"enc", "dec"} {
					name := fmt.Sprintf("impl=%v/sector=%d/call=%d/%s", impl, ss, size, dir)
					b.Run(name, func(b *testing.B) {
						b.SetBytes(int64(size))
						sec := uint64(0)
						for b.Loop() {
							if dir == "enc" {
								x.EncryptSectors(buf, buf, sec)
							} else {
								x.DecryptSectors(buf, buf, sec)
							}
							sec += uint64(size / 512)
						}
					})
				}
			}
		}
	}
}

// TestXTSLargeBuffers covers buffers that the assembly path cuts into
// several calls (asmChunk): tweaks must run on across the cuts.
func TestXTSLargeBuffers(t *testing.T) {
	r := rand.New(rand.NewPCG(13, 13))
	key := xtsRandKey(r, 64)
	for _, c := range []struct{ ss, n int }{{512, 301}, {4096, 70}} {
		src := xtsRandBytes(r, c.ss*c.n)
		first := uint64(1<<32-16) &^ uint64(c.ss/512-1)
		want := xcryptoSectors(t, key, src, c.ss, first, false)
		xtsForEachImpl(t, func(t *testing.T, impl xtsImpl) {
			x := xtsMust(t, key, c.ss, impl)
			got := make([]byte, len(src))
			x.EncryptSectors(got, src, first)
			if !bytes.Equal(got, want) {
				t.Fatalf("sector %d, %d sectors: encrypt differs from x/crypto/xts", c.ss, c.n)
			}
			x.DecryptSectors(got, got, first)
			if !bytes.Equal(got, src) {
				t.Fatalf("sector %d, %d sectors: decrypt does not invert", c.ss, c.n)
			}
		})
	}
}

// FuzzXTS compares every implementation with golang.org/x/crypto/xts on
// arbitrary keys, data units and tweaks (go test -fuzz FuzzXTS).
func FuzzXTS(f *testing.F) {
	f.Add(bytes.Repeat([]byte{1, 2, 3}, 22), bytes.Repeat([]byte{0xaa}, 512), uint64(0), false)
	f.Add(bytes.Repeat([]byte{7}, 33), bytes.Repeat([]byte{0x55}, 48), uint64(1<<63), true)
	f.Add(make([]byte, 64), make([]byte, 16*17), ^uint64(0), false)
	f.Fuzz(func(t *testing.T, keySeed, data []byte, tweak uint64, aes128 bool) {
		key := make([]byte, 64)
		if aes128 {
			key = key[:32]
		}
		for i := range key {
			key[i] = byte(i)
		}
		copy(key, keySeed)
		half := len(key) / 2
		if bytes.Equal(key[:half], key[half:]) {
			key[0] ^= 0x80
		}
		data = data[:len(data)&^15]
		if len(data) == 0 {
			return
		}
		c, err := xts.NewCipher(aes.NewCipher, key)
		if err != nil {
			t.Fatal(err)
		}
		want := make([]byte, len(data))
		c.Encrypt(want, data, tweak)
		for _, impl := range supportedImpls() {
			x, err := newXTSImpl(key, 512, impl)
			if err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(data))
			x.cryptUnit(got, data, tweak, false)
			if !bytes.Equal(got, want) {
				t.Fatalf("%v: %d-byte unit, tweak %d: differs from x/crypto/xts", impl, len(data), tweak)
			}
			x.cryptUnit(got, got, tweak, true)
			if !bytes.Equal(got, data) {
				t.Fatalf("%v: decrypt does not invert", impl)
			}
		}
	})
}
