package kmsclient

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"sigs.k8s.io/yaml"
)

// DefaultID is the kmsID used when a StorageClass names none.
const DefaultID = "default"

// Config lists the KMS plugins the driver may use, by kmsID.
type Config struct {
	Entries []Entry `json:"kms"`
}

// Entry is one configured KMS plugin.
type Entry struct {
	// ID is what a StorageClass's kmsID parameter names.
	ID string `json:"id"`
	// Endpoint is the plugin's unix socket, "unix:///path".
	Endpoint string `json:"endpoint"`
	// Timeout bounds each call ("5s"; DefaultTimeout when empty).
	Timeout Duration `json:"timeout,omitempty"`
}

// Duration is a time.Duration written as "5s" in configuration files.
type Duration struct{ time.Duration }

// UnmarshalJSON parses a Go duration string.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("timeout: want a duration string like \"5s\"")
	}
	v, err := time.ParseDuration(s)
	if err != nil || v <= 0 {
		return fmt.Errorf("timeout %q: want a positive duration like \"5s\"", s)
	}
	d.Duration = v
	return nil
}

// MarshalJSON writes the duration as a string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(d.String()) }

// LoadConfig reads a YAML or JSON configuration file:
//
//	kms:
//	- id: default
//	  endpoint: unix:///run/kms/plugin.sock
//	  timeout: 5s
func LoadConfig(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("kms config: %w", err)
	}
	js, err := yaml.YAMLToJSON(data)
	if err != nil {
		return nil, fmt.Errorf("kms config %s: %w", path, err)
	}
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.DisallowUnknownFields()
	var cfg Config
	if err := dec.Decode(&cfg); err != nil {
		return nil, fmt.Errorf("kms config %s: %w", path, err)
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("kms config %s: %w", path, err)
	}
	return &cfg, nil
}

// Validate checks ids and endpoints.
func (c *Config) Validate() error {
	if len(c.Entries) == 0 {
		return errors.New("no kms entries")
	}
	seen := map[string]bool{}
	for i, e := range c.Entries {
		if e.ID == "" {
			return fmt.Errorf("entry %d: id is empty", i)
		}
		if seen[e.ID] {
			return fmt.Errorf("entry %d: duplicate id %q", i, e.ID)
		}
		seen[e.ID] = true
		if err := ValidateEndpoint(e.Endpoint); err != nil {
			return fmt.Errorf("entry %q: %w", e.ID, err)
		}
	}
	return nil
}

// SingleEndpoint is the configuration of --kms-endpoint: one plugin, "default".
func SingleEndpoint(endpoint string, timeout time.Duration) *Config {
	return &Config{Entries: []Entry{{ID: DefaultID, Endpoint: endpoint, Timeout: Duration{timeout}}}}
}

// Registry holds one client per configured kmsID.
type Registry struct {
	mu      sync.Mutex
	clients map[string]*Client
}

// NewRegistry makes a client for every entry of cfg. opts.Timeout is the
// default for entries that set none.
func NewRegistry(cfg *Config, opts Options) (*Registry, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	r := &Registry{clients: map[string]*Client{}}
	for _, e := range cfg.Entries {
		o := opts
		o.KMSID = e.ID
		if e.Timeout.Duration > 0 {
			o.Timeout = e.Timeout.Duration
		}
		c, err := New(e.Endpoint, o)
		if err != nil {
			r.Close()
			return nil, err
		}
		r.clients[e.ID] = c
	}
	return r, nil
}

// Get returns the client of kmsID ("" means "default"). An unknown id is an
// error that lists the configured ones.
func (r *Registry) Get(kmsID string) (*Client, error) {
	if kmsID == "" {
		kmsID = DefaultID
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if c, ok := r.clients[kmsID]; ok {
		return c, nil
	}
	return nil, fmt.Errorf("kmsID %q is not configured (configured: %s)", kmsID, strings.Join(r.idsLocked(), ", "))
}

// IDs returns the configured kms ids, sorted.
func (r *Registry) IDs() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.idsLocked()
}

func (r *Registry) idsLocked() []string {
	ids := make([]string, 0, len(r.clients))
	for id := range r.clients {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

// Close closes every client.
func (r *Registry) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	var errs []error
	for _, c := range r.clients {
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}
