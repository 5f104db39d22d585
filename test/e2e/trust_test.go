package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
	"github.com/csi-encdisk/csi-encdisk/pkg/kmsclient"
	"github.com/csi-encdisk/csi-encdisk/test/hosttest"
	"github.com/csi-encdisk/csi-encdisk/test/procmem"
)

// These tests hold the node to what it promises: secrets live only in the
// engine, the image decides whether a volume is encrypted, the driver's own
// directories are no staging ground, and the node touches only what it made.

// startKMSPlugin runs the built-in KMS plugin as its own process (as the
// chart does), so that the driver's memory holds only what the driver put
// there.
func startKMSPlugin(t *testing.T, dir string) string {
	t.Helper()
	sock := filepath.Join(dir, "kms.sock")
	keys := filepath.Join(dir, "keys")
	if err := os.MkdirAll(keys, 0o700); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, "kms.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(binary, "kms-plugin", "--listen", "unix://"+sock, "--region", "e2e-region", "--keystore", "dir:"+keys)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	for deadline := time.Now().Add(30 * time.Second); ; {
		if _, err := os.Stat(sock); err == nil {
			return "unix://" + sock
		}
		if time.Now().After(deadline) {
			t.Fatal("the KMS plugin's socket did not appear")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// volumeSecrets unwraps an image's passphrase through the KMS plugin and
// opens its keyslot, as only a test may: the passphrase and the volume key.
func volumeSecrets(t *testing.T, kmsEndpoint, image string) (pass, vk []byte) {
	t.Helper()
	f, err := os.Open(image)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h, err := crypt.ReadHeader(f)
	if err != nil {
		t.Fatal(err)
	}
	tok, ok := h.KMSToken()
	if !ok {
		t.Fatal("no KMS token")
	}
	c, err := kmsclient.New(kmsEndpoint, kmsclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	pass, err = c.Decrypt(context.Background(), "test", &kmsclient.Wrapped{Ciphertext: tok.Ciphertext, KeyID: tok.KeyID, Annotations: tok.Annotations})
	if err != nil {
		t.Fatal(err)
	}
	if vk, err = h.Unlock(pass); err != nil {
		t.Fatal(err)
	}
	return pass, vk
}

// secretNeedles are the passphrase and each 16-byte quarter of the volume
// key (an AES key schedule holds the key's halves as round keys, so the
// quarters show where a key lives in any form the engine keeps).
func secretNeedles(pass, vk []byte) (passNeedle map[string][]byte, keyNeedles map[string][]byte) {
	keyNeedles = map[string][]byte{}
	for i := 0; i < len(vk); i += 16 {
		keyNeedles[fmt.Sprintf("vk[%d:%d]", i, i+16)] = vk[i : i+16]
	}
	return map[string][]byte{"passphrase": pass}, keyNeedles
}

// TestSecretsOnlyInEngine: after stage, unstage and restage, the node
// plugin's memory holds neither the passphrase nor any part of the volume
// key; the engine holds the key (the scan's positive control) but not the
// passphrase.
func TestSecretsOnlyInEngine(t *testing.T) {
	dir := workDir(t)
	kms := startKMSPlugin(t, dir)
	ctl := startDriverMode(t, dir, "controller", "controller", "--kms-endpoint", kms)
	node := startDriverMode(t, dir, "node", "node", "--kms-endpoint", kms)
	v := ctl.createVolume(t, "secret", 64*mib, "ext4", map[string]string{"encrypted": "true"}, "")
	node.stage(t, v)
	pass, vk := volumeSecrets(t, kms, node.imagePath(t, v.id()))
	passN, keyN := secretNeedles(pass, vk)

	check := func(when string) {
		t.Helper()
		for name, n := range procmem.Hits(t, node.pid(), mergeNeedles(passN, keyN)) {
			if n != 0 {
				t.Errorf("%s: the node plugin's memory holds the %s (%d times)", when, name, n)
			}
		}
	}
	check("after stage")
	engine := node.enginePID(t, v.id())
	if n := procmem.Hits(t, engine, passN)["passphrase"]; n != 0 {
		t.Errorf("the engine still holds the passphrase (%d times)", n)
	}
	found := 0
	for _, n := range procmem.Hits(t, engine, keyN) {
		found += n
	}
	if found == 0 {
		t.Error("the scan finds no part of the volume key in the engine either: the scan does not work")
	}
	node.unstage(t, v)
	check("after unstage")
	node.stage(t, v)
	check("after restage")
	node.unstage(t, v)
}

func mergeNeedles(ms ...map[string][]byte) map[string][]byte {
	out := map[string][]byte{}
	for _, m := range ms {
		for k, v := range m {
			out[k] = v
		}
	}
	return out
}

// wantNothingStaged fails when the volume left node state, loop devices or
// mounts under dir.
func wantNothingStaged(t *testing.T, d *driver, volumeID string) {
	t.Helper()
	if d.hasNodeState(volumeID) {
		t.Errorf("volume %s left node state", volumeID)
	}
	if l := loopsUnder(d.dir); len(l) != 0 {
		t.Errorf("loop devices left: %v", l)
	}
	if m := mountsUnder(filepath.Join(d.dir, "staging")); len(m) != 0 {
		t.Errorf("mounts left: %v", m)
	}
}

// TestEncryptionDecidedByImage: a volume context that says the opposite of
// the image is FailedPrecondition and attaches nothing (an encrypted image
// staged raw would let a pod write plaintext over its header).
func TestEncryptionDecidedByImage(t *testing.T) {
	dir := workDir(t)
	d := startDriver(t, dir)
	enc := d.createVolume(t, "enc", 16*mib, blockAccess, map[string]string{"encrypted": "true"}, "")
	plain := d.createVolume(t, "plain", 16*mib, blockAccess, map[string]string{"encrypted": "false"}, "")
	for _, c := range []struct {
		v   *volume
		ctx string
	}{{enc, "false"}, {plain, "true"}} {
		if err := os.MkdirAll(c.v.StagingPath, 0o750); err != nil {
			t.Fatal(err)
		}
		volCtx := map[string]string{}
		for k, val := range c.v.Volume.GetVolumeContext() {
			volCtx[k] = val
		}
		volCtx["encrypted"] = c.ctx
		_, err := d.node.NodeStageVolume(ctxT(t), &csi.NodeStageVolumeRequest{VolumeId: c.v.id(),
			StagingTargetPath: c.v.StagingPath, VolumeCapability: c.v.Capability, VolumeContext: volCtx})
		if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "encrypted") {
			t.Fatalf("stage of %s with encrypted=%s in its context: %v, want FailedPrecondition", c.v.id(), c.ctx, err)
		}
		wantNothingStaged(t, d, c.v.id())
	}
}

// TestReservedPathsRefused: staging or target paths inside the driver's data
// or state directory are InvalidArgument, and nothing is made.
func TestReservedPathsRefused(t *testing.T) {
	dir := workDir(t)
	d := startDriver(t, dir)
	v := d.createVolume(t, "v", 16*mib, "ext4", map[string]string{"encrypted": "true"}, "")
	for _, p := range []string{filepath.Join(d.dataDir, "pool"), filepath.Join(d.dataDir, "x"), d.stateDir, filepath.Join(d.stateDir, "run")} {
		_, err := d.node.NodeStageVolume(ctxT(t), &csi.NodeStageVolumeRequest{VolumeId: v.id(),
			StagingTargetPath: p, VolumeCapability: v.Capability, VolumeContext: v.Volume.GetVolumeContext()})
		if status.Code(err) != codes.InvalidArgument {
			t.Fatalf("stage at %s: %v, want InvalidArgument", p, err)
		}
		wantNothingStaged(t, d, v.id())
	}
	d.stage(t, v)
	_, err := d.node.NodePublishVolume(ctxT(t), &csi.NodePublishVolumeRequest{VolumeId: v.id(), StagingTargetPath: v.StagingPath,
		TargetPath: filepath.Join(d.dataDir, "pool", "target"), VolumeCapability: v.Capability})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("publish into the pool: %v, want InvalidArgument", err)
	}
	d.unstage(t, v)
}

// TestUnpublishTouchesOnlyItsOwn: NodeUnpublishVolume of a target the node
// never published for that volume answers OK and leaves what is there: a
// regular file, and another volume's staging mount.
func TestUnpublishTouchesOnlyItsOwn(t *testing.T) {
	dir := workDir(t)
	d := startDriver(t, dir)
	a := d.createVolume(t, "a", 16*mib, "ext4", map[string]string{"encrypted": "true"}, "")
	b := d.createVolume(t, "b", 16*mib, "ext4", map[string]string{"encrypted": "false"}, "")
	d.stage(t, a)
	file := filepath.Join(dir, "precious")
	if err := os.WriteFile(file, []byte("keep me"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ id, TargetPath string }{
		{b.id(), file}, {"no-such-volume", file}, {b.id(), a.StagingPath}, {a.id(), a.StagingPath},
	} {
		if _, err := d.node.NodeUnpublishVolume(ctxT(t), &csi.NodeUnpublishVolumeRequest{VolumeId: c.id, TargetPath: c.TargetPath}); err != nil {
			t.Fatalf("unpublish %s at %s: %v, want OK", c.id, c.TargetPath, err)
		}
	}
	if got, err := os.ReadFile(file); err != nil || string(got) != "keep me" {
		t.Fatalf("a file the node never published was touched: %q %v", got, err)
	}
	if m := mountsUnder(a.StagingPath); len(m) == 0 {
		t.Fatal("another volume's staging mount was unmounted")
	}
	d.unstage(t, a)
}

// TestSocketModeWhateverUmask: under umask 000 the CSI socket is still 0600.
func TestSocketModeWhateverUmask(t *testing.T) {
	dir := workDir(t)
	old := syscall.Umask(0)
	d := startDriver(t, dir)
	syscall.Umask(old)
	fi, err := os.Stat(d.sock)
	if err != nil {
		t.Fatal(err)
	}
	if m := fi.Mode().Perm(); m != 0o600 {
		t.Fatalf("CSI socket mode %o under umask 000, want 600", m)
	}
}

// TestUnstageAfterEngineDeath: once an engine died, the kernel can no longer
// say what its loop device is backed by (and sysfs shows a path that is not
// the engine's file); unstage still finds and detaches it, and answers OK
// only with nothing left.
func TestUnstageAfterEngineDeath(t *testing.T) {
	dir := workDir(t)
	d := startDriver(t, dir)
	v := d.createVolume(t, "dead", 16*mib, blockAccess, map[string]string{"encrypted": "true"}, "")
	d.stage(t, v)
	loop, _ := d.nodeState(t, v.id())["loop"].(string)
	if loop == "" {
		t.Fatal("no loop device in the node state")
	}
	pid := d.enginePID(t, v.id())
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); hosttest.ProcessAlive(pid); {
		if time.Now().After(deadline) {
			t.Fatal("engine did not die")
		}
		time.Sleep(10 * time.Millisecond)
	}
	d.unstage(t, v)
	if b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(loop), "loop", "backing_file")); err == nil {
		t.Fatalf("unstage answered OK but %s is still attached (backing %q)", loop, strings.TrimSpace(string(b)))
	}
	wantNothingStaged(t, d, v.id())
}
