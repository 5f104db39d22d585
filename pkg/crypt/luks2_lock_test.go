package crypt

import (
	"errors"
	"os"
	"testing"
	"time"
)

// TestSetKMSTokenLocks: a header update waits for another open file
// description's header lock (as another process's would be), then runs;
// ReplaceKMSToken changes nothing when the token is no longer the one read.
func TestSetKMSTokenLocks(t *testing.T) {
	image, _, _, _ := formatTestImage(t, 4096, testToken)
	holder, err := os.OpenFile(image, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close()
	unlock, err := lockHeader(holder)
	if err != nil {
		t.Fatal(err)
	}
	_, f := openHeader(t, image)
	done := make(chan error, 1)
	go func() {
		done <- SetKMSToken(f, &KMSToken{KMSID: "default", KeyID: "region-a/v2", Ciphertext: []byte("second")})
	}()
	select {
	case err := <-done:
		t.Fatalf("SetKMSToken did not wait for the header lock: %v", err)
	case <-time.After(300 * time.Millisecond): // it must still be waiting
	}
	unlock()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("SetKMSToken still blocked after the lock was released")
	}
	h, err := ReadHeader(f)
	if err != nil {
		t.Fatal(err)
	}
	cur, _ := h.KMSToken()
	if cur.KeyID != "region-a/v2" {
		t.Fatalf("token %q after update", cur.KeyID)
	}
	err = ReplaceKMSToken(f, testToken, &KMSToken{KMSID: "default", KeyID: "region-a/v3", Ciphertext: []byte("third")})
	if !errors.Is(err, ErrTokenChanged) {
		t.Fatalf("ReplaceKMSToken over a changed token: %v", err)
	}
	if err := ReplaceKMSToken(f, cur, &KMSToken{KMSID: "default", KeyID: "region-a/v3", Ciphertext: []byte("third")}); err != nil {
		t.Fatal(err)
	}
}
