package nodestate

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

func TestSaveLoadListDelete(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Load("nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Load of unknown volume: got %v, want ErrNotFound", err)
	}
	ids := []string{"vol/with/slashes", "b", strings.Repeat("x", 300)}
	for _, id := range ids {
		v := &Volume{VolumeID: id, Phase: PhaseStaging, Encrypted: true, Image: "/img", AccessType: AccessMount,
			Engine: &Engine{PID: 42, File: "/run/x/fuse/data", DataOffset: 16 << 20}}
		v.AddTarget("/t1")
		v.AddTarget("/t1")
		if err := s.Save(v); err != nil {
			t.Fatalf("Save(%q): %v", id, err)
		}
	}
	got, err := s.Load(ids[0])
	if err != nil {
		t.Fatal(err)
	}
	if got.Engine == nil || got.Engine.PID != 42 || got.Phase != PhaseStaging || len(got.Targets) != 1 {
		t.Fatalf("Load returned %+v", got)
	}
	got.Phase = PhaseStaged
	got.RemoveTarget("/t1")
	if err := s.Save(got); err != nil {
		t.Fatal(err)
	}
	again, err := s.Load(ids[0])
	if err != nil {
		t.Fatal(err)
	}
	if again.Phase != PhaseStaged || len(again.Targets) != 0 {
		t.Fatalf("update not persisted: %+v", again)
	}
	all, err := s.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 3 || all[0].VolumeID != "b" {
		t.Fatalf("List: got %d volumes (first %q)", len(all), all[0].VolumeID)
	}
	if err := s.Delete("b"); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete("b"); err != nil {
		t.Fatalf("second Delete: %v", err)
	}
	if _, err := s.Load("b"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Load after Delete: %v", err)
	}
	// No temporary files remain.
	entries, _ := os.ReadDir(filepath.Join(s.Dir(), volumesDir))
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".tmp") {
			t.Fatalf("temporary file left behind: %s", e.Name())
		}
	}
	if rd := s.RunDir(strings.Repeat("y", 500)); len(rd) > len(s.Dir())+30 {
		t.Fatalf("run dir too long: %s", rd)
	}
}

func TestListReportsCorruptFile(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Save(&Volume{VolumeID: "good"}); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(s.Dir(), volumesDir, "bad.json"), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	all, err := s.List()
	if err == nil {
		t.Fatal("List: want an error for the corrupt file")
	}
	if len(all) != 1 || all[0].VolumeID != "good" {
		t.Fatalf("List must still return the good volume, got %d", len(all))
	}
}

func TestSaveRejectsEmptyID(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Save(&Volume{}); err == nil {
		t.Fatal("Save with empty volume ID: want error")
	}
	if _, err := Open(""); err == nil {
		t.Fatal("Open(\"\"): want error")
	}
}

func TestSaveWritesPrivateFileWhateverTheUmask(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	old := syscall.Umask(0)
	err = s.Save(&Volume{VolumeID: "v"})
	syscall.Umask(old)
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(s.path("v"))
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("state file mode %v, want 0600", st.Mode().Perm())
	}
}
