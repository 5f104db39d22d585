package rbd

import (
	"bytes"
	"encoding/json"
	"os"
	"testing"
)

// TestWriteToIsJSON: what WriteTo writes is the JSON of the credentials
// (what ReadCredentials parses), the key included.
func TestWriteToIsJSON(t *testing.T) {
	c := &Credentials{Monitors: `[v2:10.0.0.1:3300,v1:10.0.0.1:6789]`, User: "csi", Key: []byte("AQBzdGF0aWMta2V5LWZvci10ZXN0cw==")}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := c.WriteTo(w); err != nil {
		t.Fatal(err)
	}
	var got bytes.Buffer
	if _, err := got.ReadFrom(r); err != nil {
		t.Fatal(err)
	}
	want, _ := json.Marshal(c)
	if !bytes.Equal(got.Bytes(), want) {
		t.Fatalf("WriteTo wrote %s, json.Marshal gives %s", got.Bytes(), want)
	}
	var back Credentials
	if err := json.Unmarshal(got.Bytes(), &back); err != nil || back.User != c.User || back.Monitors != c.Monitors || !bytes.Equal(back.Key, c.Key) {
		t.Fatalf("read back %v (%v)", &back, err)
	}
}

// TestAppendJSONInAnObject: AppendJSON between a prefix and a suffix makes
// the JSON of an object holding the credentials as one field.
func TestAppendJSONInAnObject(t *testing.T) {
	c := &Credentials{Monitors: "127.0.0.1:6789", User: "csi", Key: []byte("AQBzdGF0aWMta2V5LWZvci10ZXN0cw==")}
	b, err := c.AppendJSON(`{"op":"start","credentials":`, "}")
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		Op          string       `json:"op"`
		Credentials *Credentials `json:"credentials"`
	}
	if err := json.Unmarshal(b, &got); err != nil || got.Op != "start" || got.Credentials == nil ||
		got.Credentials.User != c.User || !bytes.Equal(got.Credentials.Key, c.Key) {
		t.Fatalf("%s: %+v, %v", b, got, err)
	}
}
