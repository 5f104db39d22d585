package backend

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// TestDamagedMetadata: one damaged metadata file makes that object
// unreadable (ErrCorrupt naming it) and List skips it; the others stay
// listed, and Delete still removes the damaged one.
func TestDamagedMetadata(t *testing.T) {
	ctx := context.Background()
	p := newPool(t, t.TempDir(), Options{})
	for _, kind := range []Kind{KindVolume, KindSnapshot} {
		var ids []string
		for _, n := range []string{"a", "b", "c", "d", "e", "f"} {
			m, err := p.Create(ctx, CreateRequest{Meta: Meta{Name: n, Kind: kind, Size: 1 << 20, SectorSize: 4096}, ImageSize: 1 << 20})
			if err != nil {
				t.Fatal(err)
			}
			ids = append(ids, m.ID)
		}
		damage := map[string]func(path string){
			ids[0]: func(path string) { os.WriteFile(path, []byte("{not json"), 0o600) },
			ids[1]: func(path string) { os.WriteFile(path, nil, 0o600) },
			ids[2]: func(path string) { // valid JSON, impossible values
				os.WriteFile(path, []byte(`{"id":"`+ids[2]+`","name":"c","kind":"`+string(kind)+`","size":-5,"imageSize":1,"sectorSize":4096}`), 0o600)
			},
			ids[3]: func(path string) { // another object's metadata
				os.WriteFile(path, []byte(`{"id":"`+ids[4]+`","name":"e","kind":"`+string(kind)+`","size":4096,"imageSize":4096,"sectorSize":4096}`), 0o600)
			},
		}
		for id, f := range damage {
			f(filepath.Join(p.objDir(kind, id), metaFile))
		}
		list, err := p.List(ctx, kind)
		if err != nil {
			t.Fatalf("List with damaged metadata: %v", err)
		}
		if len(list) != 2 || list[0].ID != min(ids[4], ids[5]) {
			t.Fatalf("List: %d objects, want the 2 intact ones", len(list))
		}
		for id := range damage {
			_, err := p.Get(ctx, kind, id)
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Get %s: %v, want ErrCorrupt", id, err)
			}
			if err := p.Delete(ctx, kind, id, nil); err != nil {
				t.Fatalf("Delete %s: %v", id, err)
			}
			if _, err := os.Stat(p.objDir(kind, id)); !os.IsNotExist(err) {
				t.Fatalf("%s still there after Delete", id)
			}
		}
	}
}
