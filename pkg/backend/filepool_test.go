package backend

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
)

func newPool(t *testing.T, dir string, opts Options) *FilePool {
	t.Helper()
	p, err := NewFilePool(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func tmpEntries(t *testing.T, p *FilePool) []string {
	t.Helper()
	es, err := os.ReadDir(filepath.Join(p.Root(), tmpDir))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range es {
		names = append(names, e.Name())
	}
	return names
}

func TestCreateGetListDelete(t *testing.T) {
	ctx := context.Background()
	p := newPool(t, t.TempDir(), Options{})
	var ids []string
	for _, name := range []string{"b", "a", "c"} {
		m, err := p.Create(ctx, CreateRequest{
			Meta:      Meta{Name: name, Kind: KindVolume, Size: 1 << 20, SectorSize: 4096, Region: "r1"},
			ImageSize: 1 << 20,
		})
		if err != nil {
			t.Fatal(err)
		}
		if m.ID != ObjectID(KindVolume, name) || m.ImageSize != 1<<20 || m.CreatedAt.IsZero() {
			t.Fatalf("meta %+v", m)
		}
		ids = append(ids, m.ID)
	}
	list, err := p.List(ctx, KindVolume)
	if err != nil || len(list) != 3 {
		t.Fatalf("list: %v, %d entries", err, len(list))
	}
	for i := 1; i < len(list); i++ {
		if list[i-1].ID >= list[i].ID {
			t.Fatalf("list not sorted by ID")
		}
	}
	if snaps, _ := p.List(ctx, KindSnapshot); len(snaps) != 0 {
		t.Fatalf("snapshots listed: %d", len(snaps))
	}
	got, err := p.Get(ctx, KindVolume, ids[0])
	if err != nil || got.Name != "b" || got.Region != "r1" {
		t.Fatalf("get: %v %+v", err, got)
	}
	path, err := p.ImagePath(ids[0])
	if err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(path); err != nil || st.Size() != 1<<20 {
		t.Fatalf("image: %v", err)
	}
	// Same name again: ErrExists and the first object's metadata.
	old, err := p.Create(ctx, CreateRequest{Meta: Meta{Name: "b", Kind: KindVolume, Size: 5}})
	if !errors.Is(err, ErrExists) || old == nil || old.Size != 1<<20 {
		t.Fatalf("second create: %v %+v", err, old)
	}
	shredded := false
	if err := p.Delete(ctx, KindVolume, ids[0], func(_ context.Context, f Image) error {
		shredded = true
		_, err := f.WriteAt([]byte("x"), 0)
		return err
	}); err != nil || !shredded {
		t.Fatalf("delete: %v shredded %v", err, shredded)
	}
	if _, err := p.Get(ctx, KindVolume, ids[0]); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get after delete: %v", err)
	}
	if _, err := p.ImagePath(ids[0]); !errors.Is(err, ErrNotFound) {
		t.Fatalf("image path after delete: %v", err)
	}
	if err := p.Delete(ctx, KindVolume, ids[0], nil); err != nil {
		t.Fatalf("second delete: %v", err)
	}
	if left := tmpEntries(t, p); len(left) != 0 {
		t.Fatalf("tmp not empty: %v", left)
	}
}

func TestInvalidIDs(t *testing.T) {
	ctx := context.Background()
	p := newPool(t, t.TempDir(), Options{})
	for _, id := range []string{"", "../../etc/passwd", "vol-", "vol-../x", "snap-" + fmt.Sprintf("%032x", 1), "vol-" + fmt.Sprintf("%032X", 0xABC)} {
		if _, err := p.ImagePath(id); !errors.Is(err, ErrNotFound) {
			t.Errorf("ImagePath(%q): %v", id, err)
		}
		if _, err := p.Get(ctx, KindVolume, id); !errors.Is(err, ErrNotFound) {
			t.Errorf("Get(%q): %v", id, err)
		}
		if err := p.Delete(ctx, KindVolume, id, nil); err != nil {
			t.Errorf("Delete(%q): %v", id, err)
		}
	}
}

func TestBuildFailureLeavesNothing(t *testing.T) {
	ctx := context.Background()
	p := newPool(t, t.TempDir(), Options{})
	_, err := p.Create(ctx, CreateRequest{
		Meta:      Meta{Name: "v", Kind: KindVolume, Size: 4096},
		ImageSize: 4096,
		Build:     func(context.Context, Image) error { return errors.New("boom") },
	})
	if err == nil || err.Error() != "boom" {
		t.Fatalf("err %v", err)
	}
	if l, _ := p.List(ctx, KindVolume); len(l) != 0 {
		t.Fatalf("listed %d", len(l))
	}
	if left := tmpEntries(t, p); len(left) != 0 {
		t.Fatalf("tmp not empty: %v", left)
	}
}

// TestSparseCopyKeepsHoles copies an image with two data islands: the copy
// has the same bytes and does not allocate the hole between them.
func TestSparseCopyKeepsHoles(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	src, err := os.Create(filepath.Join(dir, "src"))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	const size = 256 << 20
	if err := src.Truncate(size); err != nil {
		t.Fatal(err)
	}
	a := bytes.Repeat([]byte("A"), 8192)
	b := bytes.Repeat([]byte("B"), 4096)
	if _, err := src.WriteAt(a, 4096); err != nil {
		t.Fatal(err)
	}
	if _, err := src.WriteAt(b, 200<<20); err != nil {
		t.Fatal(err)
	}
	dst, err := os.Create(filepath.Join(dir, "dst"))
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	if err := sparseCopy(ctx, dst, src); err != nil {
		t.Fatal(err)
	}
	st, _ := dst.Stat()
	if st.Size() != size {
		t.Fatalf("size %d", st.Size())
	}
	if blocks := st.Sys().(*syscall.Stat_t).Blocks * 512; blocks > 1<<20 {
		t.Fatalf("copy allocates %d bytes; holes were filled", blocks)
	}
	got := make([]byte, len(a))
	dst.ReadAt(got, 4096)
	if !bytes.Equal(got, a) {
		t.Fatal("first island differs")
	}
	got = got[:len(b)]
	dst.ReadAt(got, 200<<20)
	if !bytes.Equal(got, b) {
		t.Fatal("second island differs")
	}
	// Through the pool (reflink or sparse copy, whichever the FS offers).
	p := newPool(t, filepath.Join(dir, "pool"), Options{})
	v, err := p.Create(ctx, CreateRequest{Meta: Meta{Name: "v", Kind: KindVolume, Size: size}, ImageSize: size,
		Build: func(_ context.Context, f Image) error { _, err := f.WriteAt(b, 100<<20); return err }})
	if err != nil {
		t.Fatal(err)
	}
	s, err := p.Create(ctx, CreateRequest{Meta: Meta{Name: "s", Kind: KindSnapshot, Size: size}, Source: v, ImageSize: size + 4096})
	if err != nil {
		t.Fatal(err)
	}
	f, err := p.OpenImage(ctx, KindSnapshot, s.ID)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	f.ReadAt(got, 100<<20)
	if !bytes.Equal(got, b) || s.ImageSize != size+4096 {
		t.Fatalf("snapshot content or size wrong (%d)", s.ImageSize)
	}
}

// TestSameNameAtOnce: concurrent creates of one name under Lock make one
// object; the others see it.
func TestSameNameAtOnce(t *testing.T) {
	ctx := context.Background()
	p := newPool(t, t.TempDir(), Options{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	created, existed := 0, 0
	for range 8 {
		wg.Go(func() {
			unlock, err := p.Lock(ctx, KindVolume, "same")
			if err != nil {
				t.Error(err)
				return
			}
			defer unlock()
			_, err = p.Create(ctx, CreateRequest{Meta: Meta{Name: "same", Kind: KindVolume, Size: 4096}, ImageSize: 4096})
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				created++
			case errors.Is(err, ErrExists):
				existed++
			default:
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if created != 1 || existed != 7 {
		t.Fatalf("created %d, existed %d", created, existed)
	}
}

func TestResize(t *testing.T) {
	ctx := context.Background()
	p := newPool(t, t.TempDir(), Options{})
	v, err := p.Create(ctx, CreateRequest{Meta: Meta{Name: "v", Kind: KindVolume, Size: 4096}, ImageSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	m, err := p.Resize(ctx, v.ID, 8192, 8192)
	if err != nil || m.Size != 8192 || m.ImageSize != 8192 {
		t.Fatalf("resize: %v %+v", err, m)
	}
	path, _ := p.ImagePath(v.ID)
	if st, _ := os.Stat(path); st.Size() != 8192 {
		t.Fatalf("image size %d", st.Size())
	}
	if again, _ := p.Get(ctx, KindVolume, v.ID); again.Size != 8192 {
		t.Fatalf("metadata not updated: %+v", again)
	}
	if _, err := p.Resize(ctx, ObjectID(KindVolume, "nope"), 1, 1); !errors.Is(err, ErrNotFound) {
		t.Fatalf("resize of missing: %v", err)
	}
}

func TestCapacityAndWritable(t *testing.T) {
	ctx := context.Background()
	p := newPool(t, t.TempDir(), Options{})
	c, err := p.Capacity(ctx)
	if err != nil || c <= 0 {
		t.Fatalf("capacity %d: %v", c, err)
	}
	if err := p.CheckWritable(ctx); err != nil {
		t.Fatal(err)
	}
	if left := tmpEntries(t, p); len(left) != 0 {
		t.Fatalf("probe left %v", left)
	}
}

// crashEnv makes the test binary a child that creates (or deletes) one
// object and SIGKILLs itself at the fault point named by the variable.
const crashEnv = "BACKEND_TEST_CRASH_AT"

func TestMain(m *testing.M) {
	if point := os.Getenv(crashEnv); point != "" {
		crashChild(point)
		os.Exit(3) // not reached: the child kills itself
	}
	os.Exit(m.Run())
}

func crashChild(point string) {
	kill := func(p string) {
		if p == point {
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
			select {}
		}
	}
	p, err := NewFilePool(os.Getenv("BACKEND_TEST_DIR"), Options{Fault: kill})
	if err != nil {
		os.Exit(4)
	}
	ctx := context.Background()
	if point == FaultDeleteShredded {
		_ = p.Delete(ctx, KindVolume, ObjectID(KindVolume, "victim"), func(context.Context, Image) error { return nil })
		os.Exit(5)
	}
	src, _ := p.Get(ctx, KindVolume, ObjectID(KindVolume, "src"))
	_, _ = p.Create(ctx, CreateRequest{Meta: Meta{Name: "victim", Kind: KindVolume, Size: 1 << 20}, Source: src, ImageSize: 2 << 20,
		Build: func(context.Context, Image) error { return nil }})
	os.Exit(5)
}

// TestKillDuringCreate kills a process at each point of Create: the pool
// then lists nothing half-made, its leftovers go at the next open, and the
// retried create succeeds. A kill after the shredding step of Delete leaves
// the object, which a retried Delete removes.
func TestKillDuringCreate(t *testing.T) {
	ctx := context.Background()
	for _, point := range []string{FaultCreateCopied, FaultCreateBuilt, FaultCreateBeforeRename, FaultDeleteShredded} {
		t.Run(point, func(t *testing.T) {
			dir := t.TempDir()
			p := newPool(t, dir, Options{})
			src, err := p.Create(ctx, CreateRequest{Meta: Meta{Name: "src", Kind: KindVolume, Size: 1 << 20}, ImageSize: 1 << 20})
			if err != nil {
				t.Fatal(err)
			}
			if point == FaultDeleteShredded {
				if _, err := p.Create(ctx, CreateRequest{Meta: Meta{Name: "victim", Kind: KindVolume, Size: 4096}, ImageSize: 4096}); err != nil {
					t.Fatal(err)
				}
			}
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), crashEnv+"="+point, "BACKEND_TEST_DIR="+dir)
			err = cmd.Run()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
				t.Fatalf("child did not die of SIGKILL at %s: %v", point, err)
			}
			p = newPool(t, dir, Options{}) // a restart: cleans leftovers
			if left := tmpEntries(t, p); len(left) != 0 {
				t.Fatalf("leftovers after restart: %v", left)
			}
			list, _ := p.List(ctx, KindVolume)
			if point == FaultDeleteShredded {
				if len(list) != 2 {
					t.Fatalf("delete killed before removal: %d volumes listed, want 2", len(list))
				}
				if err := p.Delete(ctx, KindVolume, ObjectID(KindVolume, "victim"), nil); err != nil {
					t.Fatal(err)
				}
				if list, _ = p.List(ctx, KindVolume); len(list) != 1 {
					t.Fatalf("retried delete left %d volumes", len(list))
				}
				return
			}
			if len(list) != 1 || list[0].ID != src.ID {
				t.Fatalf("half-made volume listed: %d entries", len(list))
			}
			m, err := p.Create(ctx, CreateRequest{Meta: Meta{Name: "victim", Kind: KindVolume, Size: 1 << 20}, Source: src, ImageSize: 2 << 20})
			if err != nil || m.ImageSize != 2<<20 {
				t.Fatalf("retry: %v", err)
			}
		})
	}
}
