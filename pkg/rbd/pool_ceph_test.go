//go:build ceph

package rbd

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-encdisk/csi-encdisk/pkg/backend"
	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
)

func newTestPool(t *testing.T) (*TestCluster, *Pool) {
	c := NewTestCluster(t)
	p, err := NewPool(c.Pool)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return c, p
}

func formatBuild(key, pass []byte, size int64) backend.BuildFunc {
	return func(_ context.Context, img backend.Image) error {
		_, err := crypt.Format(img, size, crypt.FormatOptions{SectorSize: 4096, VolumeKey: key, Passphrase: pass, PBKDF2Iterations: 1000})
		return err
	}
}

func shred(_ context.Context, img backend.Image) error { return crypt.Wipe(img) }

func TestPoolLifecycle(t *testing.T) {
	c, p := newTestPool(t)
	ctx := c.Ctx(context.Background())
	key, pass := make([]byte, 64), []byte("pool test passphrase")
	rand.Read(key)
	name := fmt.Sprintf("lifecycle-%d", time.Now().UnixNano())
	const size = 64 << 20
	v, err := p.Create(ctx, backend.CreateRequest{Meta: backend.Meta{Name: name, Kind: backend.KindVolume, Size: size, Encrypted: true},
		ImageSize: crypt.DefaultDataOffset + size, Build: formatBuild(key, pass, size)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Create(ctx, backend.CreateRequest{Meta: backend.Meta{Name: name, Kind: backend.KindVolume, Size: size}}); !errors.Is(err, backend.ErrExists) {
		t.Fatalf("second create: %v", err)
	}
	// Data written through librbd at the data offset.
	data := bytes.Repeat([]byte("ciphertext-stand-in "), 4096/20+1)[:4096]
	img, err := p.OpenImageForUpdate(ctx, backend.KindVolume, v.ID)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(data, crypt.DefaultDataOffset); err != nil {
		t.Fatal(err)
	}
	img.Close()

	s, err := p.Create(ctx, backend.CreateRequest{Meta: backend.Meta{Name: name + "-snap", Kind: backend.KindSnapshot, Size: size, Encrypted: true, SourceVolumeID: v.ID}, Source: v})
	if err != nil {
		t.Fatal(err)
	}
	r, err := p.Create(ctx, backend.CreateRequest{Meta: backend.Meta{Name: name + "-restore", Kind: backend.KindVolume, Size: 2 * size, Encrypted: true}, Source: s, ImageSize: crypt.DefaultDataOffset + 2*size})
	if err != nil {
		t.Fatal(err)
	}
	if r.ImageSize != crypt.DefaultDataOffset+2*size {
		t.Fatalf("restore image size %d", r.ImageSize)
	}
	for _, id := range []string{s.ID, r.ID} {
		kind := backend.KindVolume
		if strings.HasPrefix(id, "snap-") {
			kind = backend.KindSnapshot
		}
		img, err := p.OpenImage(ctx, kind, id)
		if err != nil {
			t.Fatal(err)
		}
		h, err := crypt.ReadHeader(img)
		if err != nil {
			t.Fatalf("%s: %v", id, err)
		}
		vk, err := h.Unlock(pass)
		if err != nil || !bytes.Equal(vk, key) {
			t.Fatalf("%s does not unlock with the source's passphrase to its key: %v", id, err)
		}
		got := make([]byte, len(data))
		if _, err := img.ReadAt(got, crypt.DefaultDataOffset); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("%s: data differs: %v", id, err)
		}
		img.Close()
	}
	if list, err := p.List(ctx, backend.KindVolume); err != nil || !hasID(list, v.ID) || !hasID(list, r.ID) {
		t.Fatalf("list: %v", err)
	}
	if m, err := p.Resize(ctx, r.ID, crypt.DefaultDataOffset+4*size, 4*size); err != nil || m.Size != 4*size {
		t.Fatalf("resize: %v", err)
	}
	if n, err := p.Capacity(ctx); err != nil || n <= 0 {
		t.Fatalf("capacity %d: %v", n, err)
	}
	// The source goes first: its snapshots have clones, so it waits in the trash.
	if err := p.Delete(ctx, backend.KindVolume, v.ID, shred); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Get(ctx, backend.KindVolume, v.ID); !errors.Is(err, backend.ErrNotFound) {
		t.Fatalf("deleted volume: %v", err)
	}
	if !strings.Contains(c.CLI(t, "rbd", "trash", "ls", c.Pool), v.ID) {
		t.Fatalf("source with clones is not in the trash")
	}
	// The restore still reads (its parent chain lives in the trash).
	img, err = p.OpenImage(ctx, backend.KindVolume, r.ID)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	if _, err := img.ReadAt(got, crypt.DefaultDataOffset); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("restore after the source's delete: %v", err)
	}
	img.Close()
	if err := p.Delete(ctx, backend.KindSnapshot, s.ID, shred); err != nil {
		t.Fatal(err)
	}
	if err := p.Delete(ctx, backend.KindVolume, r.ID, shred); err != nil {
		t.Fatal(err)
	}
	if err := p.Delete(ctx, backend.KindVolume, r.ID, shred); err != nil {
		t.Fatalf("second delete: %v", err)
	}
	for _, args := range [][]string{{"ls", c.Pool}, {"trash", "ls", c.Pool}} {
		out := c.CLI(t, "rbd", args...)
		for _, id := range []string{v.ID, s.ID, r.ID} {
			if strings.Contains(out, id) {
				t.Fatalf("rbd %v still lists %s:\n%s", args, id, out)
			}
		}
	}
}

func hasID(list []*backend.Meta, id string) bool {
	for _, m := range list {
		if m.ID == id {
			return true
		}
	}
	return false
}

// TestCloneIsConstantTime: a clone of a written 4 GiB volume takes about
// as long as one of 64 MiB (RBD copy-on-write; no data is copied).
func TestCloneIsConstantTime(t *testing.T) {
	c, p := newTestPool(t)
	ctx := c.Ctx(context.Background())
	stamp := time.Now().UnixNano()
	times := map[int64]time.Duration{}
	for _, size := range []int64{64 << 20, 4 << 30} {
		name := fmt.Sprintf("clonetime-%d-%d", size, stamp)
		v, err := p.Create(ctx, backend.CreateRequest{Meta: backend.Meta{Name: name, Kind: backend.KindVolume, Size: size}, ImageSize: size})
		if err != nil {
			t.Fatal(err)
		}
		// Write 1 MiB every 64 MiB, so that the image has objects throughout.
		img, _ := p.OpenImageForUpdate(ctx, backend.KindVolume, v.ID)
		buf := make([]byte, 1<<20)
		rand.Read(buf)
		for off := int64(0); off < size; off += 64 << 20 {
			if _, err := img.WriteAt(buf, off); err != nil {
				t.Fatal(err)
			}
		}
		img.Close()
		var best time.Duration
		for i := range 3 {
			start := time.Now()
			cl, err := p.Create(ctx, backend.CreateRequest{Meta: backend.Meta{Name: fmt.Sprintf("%s-clone%d", name, i), Kind: backend.KindVolume, Size: size}, Source: v})
			d := time.Since(start)
			if err != nil {
				t.Fatal(err)
			}
			if best == 0 || d < best {
				best = d
			}
			defer p.Delete(ctx, backend.KindVolume, cl.ID, nil)
		}
		defer p.Delete(ctx, backend.KindVolume, v.ID, nil)
		times[size] = best
		t.Logf("clone of %d MiB: best of 3 %v", size>>20, best)
	}
	if small, big := times[64<<20], times[4<<30]; big > 2*small+200*time.Millisecond {
		t.Fatalf("clone of 4 GiB took %v, of 64 MiB %v: not O(1)", big, small)
	}
}

func TestQuotaFullIsEDQUOT(t *testing.T) {
	c, p := newTestPool(t)
	ctx := c.Ctx(context.Background())
	// A pool of its own, with a quota below what is already in it.
	pool := fmt.Sprintf("quota%d", time.Now().UnixNano()%1e6)
	c.CLI(t, "ceph", "osd", "pool", "create", pool, "8", "8")
	c.CLI(t, "rbd", "pool", "init", pool)
	defer c.CLI(t, "ceph", "osd", "pool", "rm", pool, pool, "--yes-i-really-really-mean-it")
	c.CLI(t, "ceph", "auth", "caps", "client.csi", "mon", "profile rbd", "osd", "profile rbd pool="+c.Pool+", profile rbd pool="+pool, "mgr", "profile rbd")
	defer c.CLI(t, "ceph", "auth", "caps", "client.csi", "mon", "profile rbd", "osd", "profile rbd pool="+c.Pool, "mgr", "profile rbd pool="+c.Pool)
	qp, err := NewPool(pool)
	if err != nil {
		t.Fatal(err)
	}
	defer qp.Close()
	_ = p
	v, err := qp.Create(ctx, backend.CreateRequest{Meta: backend.Meta{Name: "fill", Kind: backend.KindVolume, Size: 8 << 20}, ImageSize: 8 << 20,
		Build: func(_ context.Context, img backend.Image) error {
			_, err := img.WriteAt(make([]byte, 4<<20), 0)
			return err
		}})
	if err != nil {
		t.Fatal(err)
	}
	c.CLI(t, "ceph", "osd", "pool", "set-quota", pool, "max_bytes", "1048576")
	// The monitors mark the pool full once the usage reported by the OSDs
	// reaches them: seconds when idle, over a minute on a loaded machine.
	deadline := time.Now().Add(3 * time.Minute)
	for {
		_, err = qp.Create(ctx, backend.CreateRequest{Meta: backend.Meta{Name: "more", Kind: backend.KindVolume, Size: 8 << 20}, ImageSize: 8 << 20})
		if errors.Is(err, syscall.EDQUOT) || time.Now().After(deadline) {
			break
		}
		if err == nil {
			_ = qp.Delete(ctx, backend.KindVolume, backend.ObjectID(backend.KindVolume, "more"), nil)
		}
		time.Sleep(time.Second) // the quota applies once the mgr's stats show the use
	}
	if !errors.Is(err, syscall.EDQUOT) {
		t.Fatalf("create in a full pool: %v, want EDQUOT", err)
	}
	c.CLI(t, "ceph", "osd", "pool", "set-quota", pool, "max_bytes", "0")
	_ = qp.Delete(ctx, backend.KindVolume, v.ID, nil)
}

func TestCredentialsNeverShown(t *testing.T) {
	c := NewTestCluster(t)
	key := string(c.Creds.Key)
	for _, s := range []string{fmt.Sprint(c.Creds), fmt.Sprintf("%+v", c.Creds), fmt.Sprintf("%#v", c.Creds), fmt.Sprintf("%s", c.Creds)} {
		if strings.Contains(s, key) {
			t.Fatalf("formatted credentials show the key: %s", s)
		}
	}
	// A malformed key never reaches librados (which would log it).
	if _, err := Connect(context.Background(), &Credentials{Monitors: c.Creds.Monitors, User: "csi", Key: []byte("AQBadBadBadBadBadBadBadBadBadBadBadBadBA==")}, true); err == nil || !strings.Contains(err.Error(), SecretUserKey) {
		t.Fatalf("malformed key: %v", err)
	}
	// A well-formed wrong key: neither the error nor librados's stderr shows it.
	wrong := append([]byte(nil), c.Creds.Key...)
	wrong[20] ^= 1
	if wrong[20] == '=' || wrong[20] == '+'^1 {
		wrong[20] = 'A'
	}
	stderr := captureStderr(t)
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	_, err := Connect(ctx, &Credentials{Monitors: c.Creds.Monitors, User: "csi", Key: wrong}, true)
	logged := stderr()
	if err == nil {
		t.Fatal("a wrong key connected")
	}
	for _, k := range []string{string(wrong), key} {
		if strings.Contains(err.Error(), k) || strings.Contains(logged, k) {
			t.Fatalf("a key shows in the error (%v) or on stderr (%q)", err, logged)
		}
	}
	for _, k := range []string{SecretUserKey, SecretUserID, SecretMonitors} {
		s := c.Secrets()
		s[k] = "bad value \x00"
		_, err := FromSecrets(s)
		if err == nil || !strings.Contains(err.Error(), k) || strings.Contains(err.Error(), "bad value") {
			t.Fatalf("secret %s: %v", k, err)
		}
	}
	// No credentials in the context and none cached: Unavailable, not a hang.
	p, _ := NewPool(c.Pool)
	if _, err := p.List(context.Background(), backend.KindVolume); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("list without credentials: %v", err)
	}
}

// captureStderr sends fd 2 to a pipe until the returned func, which returns
// what was written (librados writes there directly).
func captureStderr(t *testing.T) func() string {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	saved, err := unix.Dup(2)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Dup2(int(w.Fd()), 2); err != nil {
		t.Fatal(err)
	}
	out := make(chan string)
	go func() { b, _ := io.ReadAll(r); out <- string(b) }()
	return func() string {
		_ = unix.Dup2(saved, 2)
		unix.Close(saved)
		w.Close()
		s := <-out
		r.Close()
		os.Stderr.WriteString(s)
		return s
	}
}
