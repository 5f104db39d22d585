package kmsclient_test

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/csi-encdisk/csi-encdisk/pkg/kmsclient"
)

// writeConfig writes content to a file named name in a fresh temp dir.
func writeConfig(t *testing.T, name, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func checkEntries(t *testing.T, cfg *kmsclient.Config) {
	t.Helper()
	want := []kmsclient.Entry{
		{ID: "default", Endpoint: "unix:///run/kms/a.sock", Timeout: kmsclient.Duration{Duration: 5 * time.Second}},
		{ID: "hsm", Endpoint: "unix:///run/kms/b.sock"},
	}
	if len(cfg.Entries) != len(want) {
		t.Fatalf("entries: got %+v, want %+v", cfg.Entries, want)
	}
	for i := range want {
		if cfg.Entries[i] != want[i] {
			t.Errorf("entry %d: got %+v, want %+v", i, cfg.Entries[i], want[i])
		}
	}
}

func TestLoadConfigYAML(t *testing.T) {
	path := writeConfig(t, "kms.yaml", `
# two plugins; the second uses the default timeout
kms:
- id: default
  endpoint: unix:///run/kms/a.sock
  timeout: 5s
- id: hsm
  endpoint: "unix:///run/kms/b.sock"
`)
	cfg, err := kmsclient.LoadConfig(path)
	if err != nil {
		t.Fatalf("LoadConfig: %v", err)
	}
	checkEntries(t, cfg)
}

func TestLoadConfigJSON(t *testing.T) {
	path := writeConfig(t, "kms.json", `{"kms": [
  {"id": "default", "endpoint": "unix:///run/kms/a.sock", "timeout": "5s"},
  {"id": "hsm", "endpoint": "unix:///run/kms/b.sock"}
]}`)
	cfg, err := kmsclient.LoadConfig(path)
	if err != nil {
		t.Fatalf("LoadConfig: %v", err)
	}
	checkEntries(t, cfg)
}

// Every bad file is refused with an error that names the file and the
// problem (the field, the id or the bad value).
func TestLoadConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		name, content string
		want          []string // substrings of the error
	}{
		{"unknown field", "kms:\n- id: a\n  endpoint: unix:///a.sock\n  endpoit: x\n", []string{`unknown field "endpoit"`}},
		{"unknown top-level field", "plugins:\n- id: a\n", []string{`unknown field "plugins"`}},
		{"duplicate id", "kms:\n- id: a\n  endpoint: unix:///a.sock\n- id: a\n  endpoint: unix:///b.sock\n", []string{"entry 1", `duplicate id "a"`}},
		{"empty id", "kms:\n- id: \"\"\n  endpoint: unix:///a.sock\n", []string{"entry 0", "id is empty"}},
		{"missing id", "kms:\n- endpoint: unix:///a.sock\n", []string{"entry 0", "id is empty"}},
		{"tcp endpoint", "kms:\n- id: a\n  endpoint: tcp://x\n", []string{`entry "a"`, `"tcp://x"`, "unix:///"}},
		{"relative socket path", "kms:\n- id: a\n  endpoint: unix://run/kms.sock\n", []string{`entry "a"`, `"unix://run/kms.sock"`, "absolute"}},
		{"bare path endpoint", "kms:\n- id: a\n  endpoint: /run/kms.sock\n", []string{`entry "a"`, `"/run/kms.sock"`}},
		{"empty endpoint", "kms:\n- id: a\n", []string{`entry "a"`, `endpoint ""`}},
		{"timeout not a duration", "kms:\n- id: a\n  endpoint: unix:///a.sock\n  timeout: soon\n", []string{"timeout", `"soon"`}},
		{"timeout without unit", "kms:\n- id: a\n  endpoint: unix:///a.sock\n  timeout: 5\n", []string{"timeout", "duration"}},
		{"negative timeout", "kms:\n- id: a\n  endpoint: unix:///a.sock\n  timeout: -1s\n", []string{"timeout", `"-1s"`, "positive"}},
		{"no entries", "kms: []\n", []string{"no kms entries"}},
		{"empty file", "", []string{"no kms entries"}},
		{"not yaml", "kms: [\n", []string{"kms config"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := writeConfig(t, "kms.yaml", tc.content)
			cfg, err := kmsclient.LoadConfig(path)
			if err == nil {
				t.Fatalf("LoadConfig accepted %q: %+v", tc.content, cfg)
			}
			for _, w := range append(tc.want, path) {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
}

func TestLoadConfigMissingFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "absent.yaml")
	_, err := kmsclient.LoadConfig(path)
	if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), path) {
		t.Fatalf("LoadConfig of a missing file: %v", err)
	}
}

func TestRegistryGet(t *testing.T) {
	cfg := &kmsclient.Config{Entries: []kmsclient.Entry{
		{ID: "zeta", Endpoint: "unix:///run/kms/z.sock"},
		{ID: "default", Endpoint: "unix:///run/kms/d.sock"},
		{ID: "alpha", Endpoint: "unix:///run/kms/a.sock"},
	}}
	r, err := kmsclient.NewRegistry(cfg, kmsclient.Options{})
	if err != nil {
		t.Fatalf("NewRegistry: %v", err)
	}
	t.Cleanup(func() { r.Close() })

	for id, endpoint := range map[string]string{
		"":        "unix:///run/kms/d.sock", // "" means "default"
		"default": "unix:///run/kms/d.sock",
		"alpha":   "unix:///run/kms/a.sock",
		"zeta":    "unix:///run/kms/z.sock",
	} {
		c, err := r.Get(id)
		if err != nil {
			t.Fatalf("Get(%q): %v", id, err)
		}
		if c.Endpoint() != endpoint {
			t.Errorf("Get(%q).Endpoint() = %q, want %q", id, c.Endpoint(), endpoint)
		}
	}
	_, err = r.Get("beta")
	if err == nil {
		t.Fatal(`Get("beta") of an unconfigured id succeeded`)
	}
	for _, w := range []string{`"beta"`, "alpha, default, zeta"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not contain %q", err, w)
		}
	}
	if got := strings.Join(r.IDs(), ","); got != "alpha,default,zeta" {
		t.Errorf("IDs() = %s", got)
	}
}

// Without a "default" entry, Get("") fails and names what is configured.
func TestRegistryNoDefault(t *testing.T) {
	r, err := kmsclient.NewRegistry(&kmsclient.Config{Entries: []kmsclient.Entry{{ID: "hsm", Endpoint: "unix:///run/kms/h.sock"}}}, kmsclient.Options{})
	if err != nil {
		t.Fatalf("NewRegistry: %v", err)
	}
	t.Cleanup(func() { r.Close() })
	_, err = r.Get("")
	if err == nil || !strings.Contains(err.Error(), `"default"`) || !strings.Contains(err.Error(), "hsm") {
		t.Fatalf(`Get(""): %v; want an error naming "default" and the configured "hsm"`, err)
	}
}

func TestNewRegistryRejectsBadConfig(t *testing.T) {
	_, err := kmsclient.NewRegistry(&kmsclient.Config{Entries: []kmsclient.Entry{{ID: "a", Endpoint: "tcp://x"}}}, kmsclient.Options{})
	if err == nil || !strings.Contains(err.Error(), "tcp://x") {
		t.Fatalf("NewRegistry with a tcp endpoint: %v", err)
	}
	_, err = kmsclient.New("unix://relative.sock", kmsclient.Options{})
	if err == nil || !strings.Contains(err.Error(), "unix://relative.sock") {
		t.Fatalf("New with a relative socket: %v", err)
	}
}

// SingleEndpoint (--kms-endpoint) configures exactly "default".
func TestSingleEndpoint(t *testing.T) {
	cfg := kmsclient.SingleEndpoint("unix:///run/kms/one.sock", 3*time.Second)
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	if len(cfg.Entries) != 1 || cfg.Entries[0].ID != kmsclient.DefaultID || cfg.Entries[0].Timeout.Duration != 3*time.Second {
		t.Fatalf("SingleEndpoint: %+v", cfg.Entries)
	}
}
