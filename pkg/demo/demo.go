// Package demo walks the whole csi-encdisk story on one machine: it starts the
// built-in KMS plugin and the driver in --mode all, then acts as the CSI
// client (what Kubernetes would do) and checks every promise of the product on
// the way, printing a table of steps, results, times and KMS calls.
package demo

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/csi-encdisk/csi-encdisk/pkg/backend"
	"github.com/csi-encdisk/csi-encdisk/pkg/crypt"
	"github.com/csi-encdisk/csi-encdisk/pkg/csiclient"
	"github.com/csi-encdisk/csi-encdisk/pkg/sweep"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Options configure a demo run.
type Options struct {
	// Binary is the csi-encdisk executable to run as KMS plugin and driver.
	Binary string
	// Out receives the progress lines and the table.
	Out io.Writer
	// Dir is the parent of the demo's temporary directory ("" = os.TempDir()).
	Dir string
	// Keep leaves the temporary directory (logs, pool) in place.
	Keep bool
	// VolumeSize is the size of the encrypted volume (default 1 GiB).
	VolumeSize int64
}

// row is one line of the result table.
type row struct {
	step, result string
	took         time.Duration
	kmsCalls     string
	ok           bool
}

// run holds the state of one demo run.
type run struct {
	opts        Options
	dir         string
	dataDir     string
	kmsSock     string
	csiSock     string
	keystore    string
	region      string
	metricsAddr string
	kms, driver *process
	client      *csiclient.Client
	rows        []row
	state       storyState
	// what cleanup must undo, newest last
	published []*csiclient.Publication
	volumes   []string
	snapshots []string
}

const driverName = "encdisk.csi.io"

// Run runs the demo. It returns an error unless every check held; whatever
// happens (ctx cancelled by Ctrl-C included) it cleans up before returning.
func Run(ctx context.Context, opts Options) (err error) {
	if opts.Out == nil {
		opts.Out = os.Stdout
	}
	if opts.VolumeSize == 0 {
		opts.VolumeSize = 1 << 30
	}
	if missing := CheckPrerequisites(ctx); len(missing) > 0 {
		for _, m := range missing {
			fmt.Fprintf(opts.Out, "missing prerequisite: %s\n", m)
		}
		return fmt.Errorf("%d prerequisite(s) missing (see above)", len(missing))
	}
	if opts.Dir != "" {
		if err := os.MkdirAll(opts.Dir, 0o700); err != nil {
			return fmt.Errorf("make demo directory: %w", err)
		}
	}
	dir, err := os.MkdirTemp(opts.Dir, "csi-encdisk-demo-")
	if err != nil {
		return fmt.Errorf("make demo directory: %w", err)
	}
	r := &run{
		opts:     opts,
		dir:      dir,
		dataDir:  filepath.Join(dir, "data"),
		kmsSock:  filepath.Join(dir, "kms.sock"),
		csiSock:  filepath.Join(dir, "csi.sock"),
		keystore: "dir:" + filepath.Join(dir, "kms-keys"),
		region:   "demo-region",
	}
	fmt.Fprintf(opts.Out, "csi-encdisk demo in %s\n\n", dir)
	defer func() {
		r.cleanup()
		r.printTable()
		if opts.Keep {
			fmt.Fprintf(opts.Out, "\nkept %s (logs: kms.log, driver.log)\n", dir)
		} else {
			os.RemoveAll(dir)
		}
		if err == nil {
			for _, row := range r.rows {
				if !row.ok {
					err = errors.New("a check failed (see the table)")
				}
			}
		}
	}()
	return r.story(ctx)
}

// story is the sequence of steps; the first failing step ends it.
func (r *run) story(ctx context.Context) error {
	steps := []struct {
		name string
		fn   func(ctx context.Context) (string, error)
	}{
		{"start KMS plugin and driver (--mode all)", r.start},
		{"create encrypted 1 GiB volume", r.createEncrypted},
		{"stage and publish it (ext4)", r.stagePublishSource},
		{"write a file through the mount", r.writeFile},
		{"scan the pool for the plaintext", r.scanPool},
		{"control: same write on an unencrypted volume", r.controlUnencrypted},
		{"snapshot the encrypted volume", r.snapshot},
		{"restore the snapshot to a new volume", r.restore},
		{"stage the restored volume, read the file", r.readRestored},
		{"refuse encrypted snapshot -> unencrypted volume", r.refuseConversion},
		{"rotate the region's master key", r.rotate},
		{"restored volume stages after rotation", r.stageAfterRotation},
		{"delete everything", r.deleteAll},
		{"deleted volume's header is crypto-shredded", r.checkShredded},
	}
	for _, s := range steps {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("interrupted: %w", err)
		}
		before := r.kmsCount(ctx)
		start := time.Now()
		fmt.Fprintf(r.opts.Out, "• %s ...\n", s.name)
		result, err := s.fn(ctx)
		rw := row{step: s.name, took: time.Since(start), ok: err == nil, result: result}
		if err != nil {
			rw.result = "FAILED: " + err.Error()
			if ctx.Err() != nil {
				rw.result = "INTERRUPTED"
				err = errors.New("interrupted; everything the demo made is removed")
			}
		}
		after := r.kmsCount(ctx)
		if before < 0 && after >= 0 {
			before = 0 // the driver (and its counters) started in this step
		}
		if before >= 0 && after >= 0 {
			rw.kmsCalls = fmt.Sprintf("%.0f", after-before)
		} else {
			rw.kmsCalls = "-"
		}
		r.rows = append(r.rows, rw)
		if err != nil {
			return fmt.Errorf("%s: %w", s.name, err)
		}
	}
	return nil
}

// kmsCount returns the driver's KMS call total, or -1 when unknown.
func (r *run) kmsCount(ctx context.Context) float64 {
	if r.metricsAddr == "" || r.driver == nil || r.driver.exited() {
		return -1
	}
	sctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	n, err := kmsCalls(sctx, r.metricsAddr)
	if err != nil {
		return -1
	}
	return n
}

func (r *run) printTable() {
	if len(r.rows) == 0 {
		return
	}
	fmt.Fprintln(r.opts.Out)
	tw := tabwriter.NewWriter(r.opts.Out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "STEP\tRESULT\tTIME\tKMS CALLS")
	for _, row := range r.rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", row.step, row.result, row.took.Round(time.Millisecond), row.kmsCalls)
	}
	tw.Flush()
}

// startKMS starts the built-in KMS plugin on its unix socket.
func (r *run) startKMS(ctx context.Context) error {
	p, err := startProcess("kms-plugin", r.opts.Binary, filepath.Join(r.dir, "kms.log"),
		"kms-plugin", "--listen", "unix://"+r.kmsSock, "--region", r.region, "--keystore", r.keystore, "--create-keystore")
	if err != nil {
		return err
	}
	r.kms = p
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	return waitForSocket(wctx, p, r.kmsSock)
}

func (r *run) start(ctx context.Context) (string, error) {
	if err := r.startKMS(ctx); err != nil {
		return "", err
	}
	addr, err := freeTCPAddress()
	if err != nil {
		return "", err
	}
	r.metricsAddr = addr
	p, err := startProcess("driver", r.opts.Binary, filepath.Join(r.dir, "driver.log"),
		"driver", "--mode", "all", "--endpoint", "unix://"+r.csiSock,
		"--data-dir", r.dataDir, "--state-dir", filepath.Join(r.dir, "state"),
		"--node-id", "demo-node", "--region", r.region,
		"--kms-endpoint", "unix://"+r.kmsSock, "--metrics-address", addr)
	if err != nil {
		return "", err
	}
	r.driver = p
	wctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	if err := waitForSocket(wctx, p, r.csiSock); err != nil {
		return "", err
	}
	if r.client, err = csiclient.Dial(r.csiSock); err != nil {
		return "", err
	}
	info, err := r.client.Identity.GetPluginInfo(wctx, &csi.GetPluginInfoRequest{})
	if err != nil {
		return "", fmt.Errorf("GetPluginInfo: %w", err)
	}
	if info.GetName() != driverName {
		return "", fmt.Errorf("driver name %q, want %q", info.GetName(), driverName)
	}
	if err := r.client.WaitReady(wctx, false); err != nil {
		return "", err
	}
	return fmt.Sprintf("%s %s ready", info.GetName(), info.GetVendorVersion()), nil
}

// createVolume asks the controller for an ext4 volume and remembers it for
// cleanup.
func (r *run) createVolume(ctx context.Context, name string, size int64, params map[string]string, src *csi.VolumeContentSource) (*csi.Volume, error) {
	vol, err := r.client.CreateVolume(ctx, csiclient.VolumeRequest{Name: name, Size: size, Access: "ext4",
		Parameters: params, Source: src, Region: r.region})
	if err != nil {
		return nil, err
	}
	r.volumes = append(r.volumes, vol.GetVolumeId())
	return vol, nil
}

// stagePublish stages and publishes a volume with an ext4 filesystem and
// returns the publication (the target path is where pods would see it).
func (r *run) stagePublish(ctx context.Context, vol *csi.Volume, label string) (*csiclient.Publication, error) {
	p, err := csiclient.NewPublication(vol, "ext4", r.dir, label)
	if err != nil {
		return nil, err
	}
	r.published = append(r.published, p)
	return p, r.client.StagePublish(ctx, p)
}

// unpublishUnstage undoes stagePublish for volumeID.
func (r *run) unpublishUnstage(ctx context.Context, volumeID string) error {
	for _, p := range r.published {
		if p.ID() == volumeID {
			if err := r.client.UnpublishUnstage(ctx, p); err != nil {
				return err
			}
		}
	}
	return nil
}

// The story's state between steps.
type storyState struct {
	source, restored *csi.Volume
	sourcePub        *csiclient.Publication
	snapshotID       string
	marker           []byte
	content          []byte
	shredCopy        string // hard link to the source image, kept past DeleteVolume
	oldHeader        []byte // the source image's header and keyslot area before deletion
	newKeyID         string // the master key version made by the rotation
}

func (r *run) st() *storyState { return &r.state }

func (r *run) createEncrypted(ctx context.Context) (string, error) {
	vol, err := r.createVolume(ctx, "demo-encrypted", r.opts.VolumeSize, map[string]string{"encrypted": "true"}, nil)
	if err != nil {
		return "", fmt.Errorf("CreateVolume: %w", err)
	}
	r.st().source = vol
	if vol.GetVolumeContext()["encrypted"] != "true" {
		return "", fmt.Errorf("volume context says encrypted=%q", vol.GetVolumeContext()["encrypted"])
	}
	return fmt.Sprintf("%s, %d MiB, own random key, passphrase wrapped by KMS", vol.GetVolumeId(), vol.GetCapacityBytes()>>20), nil
}

func (r *run) stagePublishSource(ctx context.Context) (string, error) {
	pub, err := r.stagePublish(ctx, r.st().source, "source")
	if err != nil {
		return "", err
	}
	r.st().sourcePub = pub
	return "mounted at " + pub.TargetPath, nil
}

func (r *run) writeFile(ctx context.Context) (string, error) {
	marker := make([]byte, 16)
	if _, err := rand.Read(marker); err != nil {
		return "", err
	}
	st := r.st()
	st.marker = []byte("csi-encdisk demo marker " + hex.EncodeToString(marker))
	// Many copies of the marker over 4 MiB, so a leak of any block would show.
	var buf bytes.Buffer
	for buf.Len() < 4<<20 {
		buf.Write(st.marker)
		buf.WriteByte('\n')
	}
	st.content = buf.Bytes()
	if err := writeSynced(filepath.Join(st.sourcePub.TargetPath, "hello.txt"), st.content); err != nil {
		return "", err
	}
	return fmt.Sprintf("hello.txt, %d bytes, fsync'd", len(st.content)), nil
}

func writeSynced(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("fsync %s: %w", path, err)
	}
	return f.Close()
}

func (r *run) scanPool(ctx context.Context) (string, error) {
	hits, files, err := scanTree(ctx, r.dataDir, r.st().marker)
	if err != nil {
		return "", err
	}
	if hits != 0 {
		return "", fmt.Errorf("%d plaintext hits in the pool", hits)
	}
	return fmt.Sprintf("0 plaintext hits in %d pool files", files), nil
}

// controlUnencrypted shows that the scan does find plaintext where there is
// some: the same write on an unencrypted volume of the same driver.
func (r *run) controlUnencrypted(ctx context.Context) (string, error) {
	vol, err := r.createVolume(ctx, "demo-plain", 64<<20, map[string]string{"encrypted": "false"}, nil)
	if err != nil {
		return "", fmt.Errorf("CreateVolume: %w", err)
	}
	pub, err := r.stagePublish(ctx, vol, "plain")
	if err != nil {
		return "", err
	}
	if err := writeSynced(filepath.Join(pub.TargetPath, "hello.txt"), r.st().content); err != nil {
		return "", err
	}
	hits, _, err := scanTree(ctx, r.dataDir, r.st().marker)
	if err != nil {
		return "", err
	}
	if err := r.unpublishUnstage(ctx, vol.GetVolumeId()); err != nil {
		return "", err
	}
	if _, err := r.client.Controller.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: vol.GetVolumeId()}); err != nil {
		return "", fmt.Errorf("DeleteVolume: %w", err)
	}
	r.forgetVolume(vol.GetVolumeId())
	if hits == 0 {
		return "", errors.New("the scan found no plaintext even on an unencrypted volume: it proves nothing")
	}
	return fmt.Sprintf("%d plaintext hits (the scan works)", hits), nil
}

func (r *run) snapshot(ctx context.Context) (string, error) {
	resp, err := r.client.Controller.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{
		SourceVolumeId: r.st().source.GetVolumeId(),
		Name:           "demo-snapshot",
	})
	if err != nil {
		return "", fmt.Errorf("CreateSnapshot: %w", err)
	}
	snap := resp.GetSnapshot()
	r.snapshots = append(r.snapshots, snap.GetSnapshotId())
	r.st().snapshotID = snap.GetSnapshotId()
	if !snap.GetReadyToUse() {
		return "", errors.New("snapshot not ready to use")
	}
	return snap.GetSnapshotId() + ", ready, encrypted with the volume's key", nil
}

func (r *run) restore(ctx context.Context) (string, error) {
	// The class names no "encrypted": the restored volume inherits it.
	vol, err := r.createVolume(ctx, "demo-restored", r.opts.VolumeSize, map[string]string{}, csiclient.SnapshotSource(r.st().snapshotID))
	if err != nil {
		return "", fmt.Errorf("CreateVolume from snapshot: %w", err)
	}
	r.st().restored = vol
	if vol.GetVolumeContext()["encrypted"] != "true" {
		return "", fmt.Errorf("restored volume context says encrypted=%q, want inherited \"true\"", vol.GetVolumeContext()["encrypted"])
	}
	return vol.GetVolumeId() + ", encrypted (inherited key)", nil
}

// stageAndReadBack stages and publishes the restored volume under label and
// checks that hello.txt holds what the story wrote.
func (r *run) stageAndReadBack(ctx context.Context, label string) (int, error) {
	pub, err := r.stagePublish(ctx, r.st().restored, label)
	if err != nil {
		return 0, err
	}
	got, err := os.ReadFile(filepath.Join(pub.TargetPath, "hello.txt"))
	if err != nil {
		return 0, fmt.Errorf("read back: %w", err)
	}
	if !bytes.Equal(got, r.st().content) {
		return 0, fmt.Errorf("read back %d bytes that differ from the %d written", len(got), len(r.st().content))
	}
	return len(got), nil
}

func (r *run) readRestored(ctx context.Context) (string, error) {
	n, err := r.stageAndReadBack(ctx, "restored")
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("hello.txt identical (%d bytes)", n), nil
}

func (r *run) refuseConversion(ctx context.Context) (string, error) {
	_, err := r.createVolume(ctx, "demo-unencrypted-from-encrypted", r.opts.VolumeSize,
		map[string]string{"encrypted": "false"}, csiclient.SnapshotSource(r.st().snapshotID))
	if err == nil {
		return "", errors.New("the driver made an unencrypted volume from an encrypted snapshot")
	}
	st, _ := status.FromError(err)
	if st.Code() != codes.InvalidArgument {
		return "", fmt.Errorf("refused with %s, want InvalidArgument: %s", st.Code(), st.Message())
	}
	msg := st.Message()
	if len(msg) > 90 {
		msg = msg[:87] + "..."
	}
	return "InvalidArgument: " + msg, nil
}

func (r *run) rotate(ctx context.Context) (string, error) {
	if err := r.unpublishUnstage(ctx, r.st().restored.GetVolumeId()); err != nil {
		return "", err
	}
	// The built-in plugin's "rotate" command works on its keystore; the
	// plugin is restarted so that it serves the new version.
	r.kms.stop(10 * time.Second)
	out, err := runCommand(ctx, r.opts.Binary, "kms-plugin", "rotate", "--keystore", r.keystore, "--region", r.region)
	if err != nil {
		return "", fmt.Errorf("kms-plugin rotate: %w", err)
	}
	if err := r.startKMS(ctx); err != nil {
		return "", err
	}
	r.st().newKeyID = strings.TrimSpace(out)
	return "new key_id " + r.st().newKeyID, nil
}

func (r *run) stageAfterRotation(ctx context.Context) (string, error) {
	if _, err := r.stageAndReadBack(ctx, "restored-after-rotation"); err != nil {
		return "", err
	}
	// Staging re-wrapped the passphrase under the new master key version.
	img, err := findImage(r.dataDir, r.st().restored.GetVolumeId())
	if err != nil {
		return "", err
	}
	keyID, err := tokenKeyID(img)
	if err != nil {
		return "", err
	}
	if keyID != r.st().newKeyID {
		return "", fmt.Errorf("token still wrapped under %s, want %s", keyID, r.st().newKeyID)
	}
	return "file intact; passphrase re-wrapped under " + keyID + ", data untouched", nil
}

func (r *run) deleteAll(ctx context.Context) (string, error) {
	// Keep a second name of the source image so that its bytes can be
	// examined after DeleteVolume has wiped and unlinked it.
	img, err := findImage(r.dataDir, r.st().source.GetVolumeId())
	if err != nil {
		return "", err
	}
	r.st().oldHeader, err = readHead(img, crypt.DefaultDataOffset)
	if err != nil {
		return "", err
	}
	r.st().shredCopy = filepath.Join(r.dir, "deleted-source.img")
	if err := os.Link(img, r.st().shredCopy); err != nil {
		return "", fmt.Errorf("keep a link to the source image: %w", err)
	}
	n := 0
	for _, p := range r.published {
		if err := r.client.UnpublishUnstage(ctx, p); err != nil {
			return "", err
		}
	}
	for _, id := range append([]string(nil), r.volumes...) {
		if _, err := r.client.Controller.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			return "", fmt.Errorf("DeleteVolume %s: %w", id, err)
		}
		r.forgetVolume(id)
		n++
	}
	for _, id := range append([]string(nil), r.snapshots...) {
		if _, err := r.client.Controller.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: id}); err != nil {
			return "", fmt.Errorf("DeleteSnapshot %s: %w", id, err)
		}
		r.snapshots = r.snapshots[1:]
		n++
	}
	left, err := countFiles(r.dataDir, backend.ImageFileName)
	if err != nil {
		return "", err
	}
	if left != 0 {
		return "", fmt.Errorf("%d images left in the pool", left)
	}
	return fmt.Sprintf("%d volumes and snapshots deleted, pool empty", n), nil
}

func (r *run) checkShredded(ctx context.Context) (string, error) {
	return checkShredded(ctx, r.st().shredCopy, r.st().oldHeader)
}

func (r *run) forgetVolume(id string) {
	for i, v := range r.volumes {
		if v == id {
			r.volumes = append(r.volumes[:i], r.volumes[i+1:]...)
			return
		}
	}
}

// cleanup undoes whatever the story left, with a fresh context so that it
// also runs after Ctrl-C.
func (r *run) cleanup() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if r.client != nil && r.driver != nil && !r.driver.exited() {
		_ = r.client.Teardown(ctx, r.published, r.volumes)
		for _, id := range r.snapshots {
			_, _ = r.client.Controller.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: id})
		}
	}
	if r.client != nil {
		r.client.Close()
	}
	r.driver.stop(15 * time.Second)
	r.kms.stop(10 * time.Second)
	// The last line of cleanup: whatever the CSI calls could not undo.
	for _, err := range sweep.Tree(r.dir) {
		fmt.Fprintf(os.Stderr, "demo cleanup: %v\n", err)
	}
}
