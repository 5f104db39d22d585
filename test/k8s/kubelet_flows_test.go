package k8s_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/csi-encdisk/csi-encdisk/test/k8s/harness"
)

// with returns k for a subtest.
func (k *kl) with(t *testing.T) *kl {
	c, e := *k, *k.e2e
	e.t = t
	c.e2e = &e
	t.Cleanup(c.deleteUserObjects)
	return &c
}

// markerSHA is the SHA-256 of the first n bytes of `yes MARKER`.
func (k *kl) markerSHA(n int) string {
	line := k.marker + "\n"
	data := []byte(strings.Repeat(line, n/len(line)+1))[:n]
	sum := sha256.Sum256(data)
	return hex.EncodeToString(sum[:])
}

// testFilesystem: deploy/examples as a user applies them. A pod writes to the
// encrypted PVC and is deleted; a second pod reads the data back; a snapshot
// is restored into a third pod; the PVC grows while the second pod runs and
// the pod sees it; the plaintext is never in the pool; deleting the PVCs
// shreds their images.
func (k *kl) testFilesystem(t0 *testing.T) {
	k = k.with(t0)
	const size = 4 << 20
	want := k.markerSHA(size)
	k.kubectl(k.example("pvc.yaml"), "apply", "-f", "-")
	pv := k.waitBound("encdisk-data")
	image := k.imagePath(pv)

	// 1. Write, as the example's non-root user (fsGroup must make the volume writable).
	k.kubectl(k.examplePod("encdisk-writer", "encdisk-data", fmt.Sprintf(
		"set -e; yes %s | head -c %d > /data/marker; sync; echo written $(sha256sum /data/marker | cut -c1-64) uid $(id -u); sleep 3600",
		k.marker, size)), "apply", "-f", "-")
	m := k.waitPodLog("encdisk-writer", "writer", regexp.MustCompile(`written ([0-9a-f]{64}) uid (\d+)`), 3*time.Minute)
	if m[1] != want || m[2] != "1000" {
		k.t.Errorf("writer pod: wrote sha %s as uid %s, want %s as 1000", m[1], m[2], want)
	}
	if hits := k.poolHasPlaintext(); len(hits) > 0 {
		k.t.Errorf("plaintext found in the pool: %v", hits)
	}
	k.deletePod("encdisk-writer")
	k.assertNothingStaged("after the writer pod")

	// 2. Read in a second pod, which then reports the filesystem size every second.
	k.kubectl(k.examplePod("encdisk-reader", "encdisk-data",
		"echo read $(sha256sum /data/marker | cut -c1-64); while :; do echo size $(df -B1 --output=size /data | tail -1); sleep 1; done"),
		"apply", "-f", "-")
	m = k.waitPodLog("encdisk-reader", "writer", regexp.MustCompile(`read ([0-9a-f]{64})`), 3*time.Minute)
	if m[1] != want {
		k.t.Errorf("reader pod read sha %s, want %s", m[1], want)
	}
	before := k.waitPodLog("encdisk-reader", "writer", regexp.MustCompile(`size (\d+)`), time.Minute)

	// 3. A snapshot (online, the reader holds the volume), restored into a third pod.
	k.kubectl(k.example("snapshot.yaml"), "apply", "-f", "-")
	k.waitSnapshotReady("encdisk-data-snap")
	k.kubectl(k.example("restore-pvc.yaml"), "apply", "-f", "-")
	restoredPV := k.waitBound("encdisk-data-restored")
	restoredImage := k.imagePath(restoredPV)
	k.kubectl(k.examplePod("encdisk-restored-reader", "encdisk-data-restored",
		"echo read $(sha256sum /data/marker | cut -c1-64); sleep 3600"), "apply", "-f", "-")
	m = k.waitPodLog("encdisk-restored-reader", "writer", regexp.MustCompile(`read ([0-9a-f]{64})`), 3*time.Minute)
	if m[1] != want {
		k.t.Errorf("pod on the restored PVC read sha %s, want %s", m[1], want)
	}

	// 4. Expansion 1Gi -> 2Gi while the reader runs. ext4 grows online only
	// with CAP_SYS_RESOURCE, which root lacks on some hosts (this one): there
	// the driver refuses with a clear NodeResizeError, and the volume grows
	// offline at the next stage (the pod restarted, as kubelet's
	// FileSystemResizePending condition asks). xfs grows online (testXFS).
	start := time.Now()
	k.kubectl(nil, "patch", "pvc", "encdisk-data", "--namespace", ns, "--type=merge",
		"-p", `{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}`)
	grown := regexp.MustCompile(`size (1[5-9]\d{8}|2\d{9})\n`) // 1.5e9 .. 2.99e9 bytes
	if hostHasCapSysResource() {
		g := k.waitPodLog("encdisk-reader", "writer", grown, 3*time.Minute)
		k.t.Logf("online ext4 expansion: the pod saw its filesystem grow from %s to %s bytes in %s",
			before[1], strings.TrimSpace(strings.TrimPrefix(g[0], "size ")), time.Since(start).Round(100*time.Millisecond))
	} else {
		msg := k.waitPVCCondition("encdisk-data", "NodeResizeError", "CAP_SYS_RESOURCE")
		k.t.Logf("online ext4 expansion refused here as expected (no CAP_SYS_RESOURCE on this host): %s", firstLine(msg))
		k.deletePod("encdisk-reader")
		k.kubectl(k.examplePod("encdisk-reader", "encdisk-data",
			"echo read $(sha256sum /data/marker | cut -c1-64); while :; do echo size $(df -B1 --output=size /data | tail -1); sleep 1; done"),
			"apply", "-f", "-")
		g := k.waitPodLog("encdisk-reader", "writer", grown, 3*time.Minute)
		m = k.waitPodLog("encdisk-reader", "writer", regexp.MustCompile(`read ([0-9a-f]{64})`), time.Minute)
		if m[1] != want {
			k.t.Errorf("reader pod after the offline growth read sha %s, want %s", m[1], want)
		}
		k.t.Logf("ext4 expansion: the restarted pod sees its filesystem grown from %s to %s bytes, %s after the PVC patch",
			before[1], strings.TrimSpace(strings.TrimPrefix(g[0], "size ")), time.Since(start).Round(100*time.Millisecond))
	}

	if hits := k.poolHasPlaintext(); len(hits) > 0 {
		k.t.Errorf("plaintext found in the pool: %v", hits)
	}

	// 5. Delete the pods, then the PVCs: the images are shredded.
	k.deletePod("encdisk-reader")
	k.deletePod("encdisk-restored-reader")
	k.assertNothingStaged("after the readers")
	k.deletePVCsShredded(map[string]string{"encdisk-data": image, "encdisk-data-restored": restoredImage})
	k.kubectl(nil, "delete", "volumesnapshot", "encdisk-data-snap", "--namespace", ns, "--wait=true", "--timeout=60s")
}

// hostHasCapSysResource reports whether CAP_SYS_RESOURCE is in this
// process's bounding set (a privileged container gets at most that).
func hostHasCapSysResource() bool {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "CapBnd:"); ok {
			bits, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return err == nil && bits&(1<<24) != 0
		}
	}
	return false
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}

// waitPVCCondition waits for a PVC condition of type typ whose message
// contains text, and returns the message.
func (k *kl) waitPVCCondition(pvc, typ, text string) string {
	k.t.Helper()
	ctx, cancel := context.WithTimeout(k.ctx, 2*time.Minute)
	defer cancel()
	var msg string
	if err := harness.WaitFor(ctx, "PVC "+pvc+" condition "+typ, nil, 250*time.Millisecond, func(ctx context.Context) error {
		p, err := k.kube.CoreV1().PersistentVolumeClaims(ns).Get(ctx, pvc, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, c := range p.Status.Conditions {
			if string(c.Type) == typ && strings.Contains(c.Message, text) {
				msg = c.Message
				return nil
			}
		}
		return fmt.Errorf("conditions %v", p.Status.Conditions)
	}); err != nil {
		k.t.Fatal(err)
	}
	return msg
}

// testXFS: online expansion of an xfs volume seen inside the running pod.
func (k *kl) testXFS(t0 *testing.T) {
	k = k.with(t0)
	k.kubectl([]byte(`apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: encdisk-encrypted-xfs
provisioner: encdisk.csi.io
parameters:
  encrypted: "true"
  kmsID: default
  sectorSize: "4096"
  csi.storage.k8s.io/fstype: xfs
allowVolumeExpansion: true
reclaimPolicy: Delete
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: encdisk-xfs
  namespace: default
spec:
  storageClassName: encdisk-encrypted-xfs
  accessModes: [ReadWriteOnce]
  resources:
    requests:
      storage: 512Mi
`), "apply", "-f", "-")
	pv := k.waitBound("encdisk-xfs")
	image := k.imagePath(pv)
	k.kubectl(k.examplePod("encdisk-xfs-pod", "encdisk-xfs",
		fmt.Sprintf("yes %s | head -c 1048576 > /data/marker; sync; while :; do echo size $(df -B1 --output=size /data | tail -1); sleep 1; done", k.marker)),
		"apply", "-f", "-")
	before := k.waitPodLog("encdisk-xfs-pod", "writer", regexp.MustCompile(`size (\d+)\n`), 3*time.Minute)
	start := time.Now()
	k.kubectl(nil, "patch", "pvc", "encdisk-xfs", "--namespace", ns, "--type=merge",
		"-p", `{"spec":{"resources":{"requests":{"storage":"1Gi"}}}}`)
	g := k.waitPodLog("encdisk-xfs-pod", "writer", regexp.MustCompile(`size (9\d{8}|1\d{9})\n`), 3*time.Minute)
	k.t.Logf("online xfs expansion: the running pod saw its filesystem grow from %s to %s bytes in %s",
		before[1], g[1], time.Since(start).Round(100*time.Millisecond))
	if hits := k.poolHasPlaintext(); len(hits) > 0 {
		k.t.Errorf("plaintext found in the pool: %v", hits)
	}
	k.deletePod("encdisk-xfs-pod")
	k.assertNothingStaged("after the xfs pod")
	k.deletePVCsShredded(map[string]string{"encdisk-xfs": image})
	k.kubectl(nil, "delete", "storageclass", "encdisk-encrypted-xfs")
}

// deletePVCsShredded deletes PVCs with `kubectl delete pvc` and checks, through
// descriptors opened before, that each image's header and keyslots were
// overwritten, and that the images are gone.
func (k *kl) deletePVCsShredded(images map[string]string) {
	k.t.Helper()
	type held struct {
		f      *os.File
		before []byte
	}
	hold := map[string]held{}
	var names []string
	for pvc, image := range images {
		f, err := os.Open(image)
		if err != nil {
			k.t.Fatal(err)
		}
		defer f.Close()
		hold[pvc] = held{f, readAt(k.t, f, 16<<20)}
		names = append(names, pvc)
	}
	start := time.Now()
	k.kubectl(nil, append([]string{"delete", "pvc", "--namespace", ns, "--wait=true", "--timeout=60s"}, names...)...)
	ctx, cancel := context.WithTimeout(k.ctx, 2*time.Minute)
	defer cancel()
	if err := harness.WaitFor(ctx, "images deleted", nil, 250*time.Millisecond, func(context.Context) error {
		for pvc, image := range images {
			if _, err := os.Stat(image); err == nil {
				return fmt.Errorf("%s: %s still there", pvc, image)
			}
		}
		return nil
	}); err != nil {
		k.t.Fatal(err)
	}
	k.t.Logf("kubectl delete pvc %v: images gone in %s", names, time.Since(start).Round(100*time.Millisecond))
	for pvc, h := range hold {
		k.t.Logf("%s:", pvc)
		assertShredded(k.t, h.f, h.before)
	}
}

// testBlock: a raw block PVC written by one pod and read by the next.
func (k *kl) testBlock(t0 *testing.T) {
	k = k.with(t0)
	const size = 1 << 20
	want := k.markerSHA(size)
	k.kubectl([]byte(`apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: encdisk-block
  namespace: default
spec:
  storageClassName: encdisk-encrypted
  volumeMode: Block
  accessModes: [ReadWriteOnce]
  resources:
    requests:
      storage: 256Mi
`), "apply", "-f", "-")
	pv := k.waitBound("encdisk-block")
	image := k.imagePath(pv)
	pod := func(name, script string) []byte {
		return []byte(fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata:
  name: %s
  namespace: default
spec:
  containers:
    - name: c
      image: %s
      imagePullPolicy: Never
      command: ["sh", "-c", %s]
      volumeDevices:
        - name: data
          devicePath: /dev/xvda
  volumes:
    - name: data
      persistentVolumeClaim:
        claimName: encdisk-block
`, name, k.workload, strconv.Quote(k.podScript(script))))
	}
	k.kubectl(pod("encdisk-block-writer", fmt.Sprintf(
		"set -e; yes %s | head -c %d | dd of=/dev/xvda bs=64k oflag=direct conv=fsync status=none; "+
			"echo written $(head -c %d /dev/xvda | sha256sum | cut -c1-64) size $(blockdev --getsize64 /dev/xvda); sleep 3600",
		k.marker, size, size)), "apply", "-f", "-")
	m := k.waitPodLog("encdisk-block-writer", "c", regexp.MustCompile(`written ([0-9a-f]{64}) size (\d+)`), 3*time.Minute)
	if m[1] != want {
		k.t.Errorf("block writer pod: sha %s, want %s", m[1], want)
	}
	if hits := k.poolHasPlaintext(); len(hits) > 0 {
		k.t.Errorf("plaintext found in the pool: %v", hits)
	}
	k.deletePod("encdisk-block-writer")
	k.assertNothingStaged("after the block writer")
	k.kubectl(pod("encdisk-block-reader", fmt.Sprintf(
		"echo read $(dd if=/dev/xvda bs=64k count=%d iflag=direct status=none | sha256sum | cut -c1-64); sleep 3600", size/(64<<10))),
		"apply", "-f", "-")
	m = k.waitPodLog("encdisk-block-reader", "c", regexp.MustCompile(`read ([0-9a-f]{64})`), 3*time.Minute)
	if m[1] != want {
		k.t.Errorf("block reader pod: sha %s, want %s", m[1], want)
	}
	k.deletePod("encdisk-block-reader")
	k.assertNothingStaged("after the block reader")
	k.deletePVCsShredded(map[string]string{"encdisk-block": image})
}

// fioPod runs fio write+verify cycles on a PVC and logs one line per cycle.
func (k *kl) fioPod(name, claim string) []byte {
	// Each cycle: 4 KiB random writes at queue depth 8, then 1 MiB
	// sequential writes at queue depth 16 (the engine's buffer peak), each
	// verified (crc32c) after it is written.
	script := `i=0; while :; do i=$((i+1)); ` +
		`fio --filename=/data/fio.dat --size=64M --ioengine=libaio --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 ` +
		`--name=rand$i --rw=randwrite --bs=4k --iodepth=8 --name=seq$i --stonewall --rw=write --bs=1M --iodepth=16 ` +
		`--output=/tmp/out >/dev/null 2>/tmp/err; rc=$?; ` +
		`echo "cycle $i rc=$rc $(grep -o 'err=[ 0-9]*' /tmp/out | sort | uniq -c | tr -s ' \n' ' ')$(head -c 200 /tmp/err | tr '\n' ' ')"; ` +
		`[ $rc -eq 0 ] || sleep 1; done`
	return []byte(fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata:
  name: %s
  namespace: default
spec:
  terminationGracePeriodSeconds: 5
  containers:
    - name: fio
      image: %s
      imagePullPolicy: Never
      command: ["sh", "-c", %s]
      volumeMounts:
        - name: data
          mountPath: /data
  volumes:
    - name: data
      persistentVolumeClaim:
        claimName: %s
`, name, k.workload, strconv.Quote(k.podScript(script)), claim))
}

var cycleRE = regexp.MustCompile(`cycle (\d+) rc=(\d+)([^\n]*)\n`)

// cycles returns the fio pod's cycle lines so far.
func (k *kl) cycles(pod string) [][]string {
	log, _ := k.node.PodLog(ns, pod, "fio")
	return cycleRE.FindAllStringSubmatch(log, -1)
}

// testRollout: fio --verify runs on an encrypted volume while the node
// plugin's pod is deleted (the DaemonSet makes a new one), then while the
// DaemonSet rolls to another image tag. With the chart's engine host (the
// default) the engines run in its own DaemonSet and outlive both: every fio
// cycle after the disruption must pass, and the volume must then come off
// cleanly.
func (k *kl) testRollout(t0 *testing.T) {
	k = k.with(t0)
	k.underLoad("restart", "fio-restart", func() {
		old := k.nodePluginPod()
		start := time.Now()
		k.kubectl(nil, "delete", "pod", old, "--namespace", harness.ManifestsNamespace, "--wait=true", "--timeout=120s")
		k.waitNodePlugin(old)
		k.t.Logf("node plugin pod %s deleted and replaced in %s", old, time.Since(start).Round(100*time.Millisecond))
	})
	k.underLoad("upgrade", "fio-upgrade", func() {
		old := k.nodePluginPod()
		tag2 := "k8s-rollout-" + randHex(k.t, 4)
		project := "localhost/csi-encdisk:" + k.valueOf("image.tag")
		if err := k.node.Tag(k.ctx, project, "localhost/csi-encdisk:"+tag2); err != nil {
			k.t.Fatal(err)
		}
		start := time.Now()
		k.helmRun("upgrade", "image.tag="+tag2)
		name := k.waitNodePlugin(old)
		p, err := k.kube.CoreV1().Pods(harness.ManifestsNamespace).Get(k.ctx, name, metav1.GetOptions{})
		if err != nil {
			k.t.Fatal(err)
		}
		if img := p.Spec.Containers[0].Image; img != "localhost/csi-encdisk:"+tag2 {
			k.t.Errorf("after helm upgrade the node plugin runs %s, want tag %s", img, tag2)
		}
		k.t.Logf("DaemonSet rolled to tag %s in %s", tag2, time.Since(start).Round(100*time.Millisecond))
	})
}

func (k *kl) valueOf(key string) string {
	for _, v := range k.values {
		if strings.HasPrefix(v, key+"=") {
			return strings.TrimPrefix(v, key+"=")
		}
	}
	return ""
}

func (k *kl) nodePluginPod() string {
	k.t.Helper()
	pods, err := k.kube.CoreV1().Pods(harness.ManifestsNamespace).List(k.ctx, metav1.ListOptions{LabelSelector: nodePodSelector})
	if err != nil || len(pods.Items) != 1 {
		k.t.Fatalf("node plugin pods: %v (%d)", err, len(pods.Items))
	}
	return pods.Items[0].Name
}

// underLoad runs disrupt while a fio pod verifies on a fresh encrypted PVC,
// records the cycles, then deletes the pod and the PVC and checks that
// nothing is left staged.
func (k *kl) underLoad(what, name string, disrupt func()) {
	k.t.Helper()
	k.kubectl([]byte(fmt.Sprintf(`apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: %s
  namespace: default
spec:
  storageClassName: encdisk-encrypted
  accessModes: [ReadWriteOnce]
  resources:
    requests:
      storage: 512Mi
`, name)), "apply", "-f", "-")
	pv := k.waitBound(name)
	image := k.imagePath(pv)
	k.kubectl(k.fioPod(name, name), "apply", "-f", "-")
	k.waitPodLog(name, "fio", regexp.MustCompile(`cycle 2 rc=0`), 3*time.Minute)
	k.logMemory(what + " under fio")

	n := len(k.cycles(name))
	disrupt()
	// Two more cycles after the disruption, or a minute.
	ctx, cancel := context.WithTimeout(k.ctx, 90*time.Second)
	_ = harness.WaitFor(ctx, "two fio cycles after the "+what, nil, 500*time.Millisecond, func(context.Context) error {
		if got := len(k.cycles(name)); got < n+2 {
			return fmt.Errorf("%d cycles", got)
		}
		return nil
	})
	cancel()
	var failed []string
	all := k.cycles(name)
	for _, c := range all[n:] {
		if c[2] != "0" {
			failed = append(failed, strings.TrimSpace(c[0]))
		}
	}
	if len(failed) > 0 {
		k.t.Errorf("%s: fio cycles failed (the engines must survive): %v", what, failed)
	} else {
		k.t.Logf("%s: %d fio cycles after it, all rc=0", what, len(all)-n)
	}

	// Whatever happened, the volume must come off cleanly.
	k.deletePod(name)
	k.assertNothingStaged("after the fio pod of the " + what)
	k.deletePVCsShredded(map[string]string{name: image})
}

// logMemory logs the engines' memory (RSS, locked) and the node plugin
// container's cgroup usage and limit: the limit must hold every engine.
func (k *kl) logMemory(what string) {
	k.t.Helper()
	for _, e := range enginePIDs(k.dataDir) {
		pid := strings.TrimPrefix(e, "engine pid ")
		k.t.Logf("%s: engine %s: %s", what, pid, procStatus(pid, "VmRSS", "VmHWM", "VmLck", "Threads"))
		if hwm := statusKiB(pid, "VmHWM"); hwm > engineMiB<<10 {
			k.t.Errorf("%s: engine %s peaked at %d KiB RSS, over the chart's node.memory.engineMiB (%d MiB)", what, pid, hwm, engineMiB)
		}
	}
	for _, pid := range driverPIDs(k.dataDir) {
		k.t.Logf("%s: node driver %s: %s; container memory cgroup: %s", what, pid,
			procStatus(pid, "VmRSS", "VmHWM", "Threads"), memCgroup(pid))
		if hwm := statusKiB(pid, "VmHWM"); hwm > driverMiB<<10 {
			k.t.Errorf("%s: node driver %s peaked at %d KiB RSS, over the chart's node.memory.driverMiB (%d MiB)", what, pid, hwm, driverMiB)
		}
	}
}

// The chart's default node.memory values (charts/csi-encdisk/values.yaml).
const (
	engineMiB = 128
	driverMiB = 64
)

// statusKiB reads a "kB" field of /proc/PID/status (0 if absent).
func statusKiB(pid, key string) int {
	f := strings.Fields(strings.TrimPrefix(procStatus(pid, key), key+":"))
	if len(f) == 0 {
		return 0
	}
	v, _ := strconv.Atoi(f[0])
	return v
}

func procStatus(pid string, keys ...string) string {
	data, err := os.ReadFile(filepath.Join("/proc", pid, "status"))
	if err != nil {
		return err.Error()
	}
	var out []string
	for _, line := range strings.Split(string(data), "\n") {
		for _, k := range keys {
			if strings.HasPrefix(line, k+":") {
				out = append(out, strings.Join(strings.Fields(line), " "))
			}
		}
	}
	return strings.Join(out, ", ")
}

func driverPIDs(dataDir string) []string {
	entries, _ := os.ReadDir("/proc")
	var out []string
	for _, e := range entries {
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(string(cmdline), "\x00")
		if len(args) > 2 && args[1] == "driver" && strings.Contains(string(cmdline), "--mode=node") &&
			strings.Contains(string(cmdline), dataDir) {
			out = append(out, e.Name())
		}
	}
	return out
}

// memCgroup describes the v1 memory cgroup of pid: usage, peak and limit.
func memCgroup(pid string) string {
	data, err := os.ReadFile(filepath.Join("/proc", pid, "cgroup"))
	if err != nil {
		return err.Error()
	}
	for _, line := range strings.Split(string(data), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) == 3 && parts[1] == "memory" {
			dir := filepath.Join("/sys/fs/cgroup/memory", parts[2])
			read := func(f string) string {
				b, err := os.ReadFile(filepath.Join(dir, f))
				if err != nil {
					return "?"
				}
				v, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
				if err != nil {
					return strings.TrimSpace(string(b))
				}
				return fmt.Sprintf("%.1f MiB", float64(v)/(1<<20))
			}
			return fmt.Sprintf("usage %s, peak %s, limit %s", read("memory.usage_in_bytes"),
				read("memory.max_usage_in_bytes"), read("memory.limit_in_bytes"))
		}
	}
	return "no memory cgroup"
}
