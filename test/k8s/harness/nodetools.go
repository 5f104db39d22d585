package harness

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"time"
)

// RegistrarVersion names the node-driver-registrar source the harness builds:
// kubernetes-csi/node-driver-registrar at commit 3482d444 (after v2.17.0) with
// its vendor/ directory, as a tarball outside the repository (the module
// proxy does not serve it: its v2 tags lack a /v2 module path).
const RegistrarVersion = "v2.17.0-40-g3482d444"

// ThirdPartyDir is where the third-party source tarballs are:
// $CSI_ENCDISK_THIRDPARTY, or ../shared/thirdparty next to the checkout.
func (b *Builder) ThirdPartyDir() string {
	if d := os.Getenv("CSI_ENCDISK_THIRDPARTY"); d != "" {
		return d
	}
	return filepath.Join(filepath.Dir(b.Root), "shared", "thirdparty")
}

// NodeTools are the binaries of the test node besides kubelet.
type NodeTools struct {
	Pause     string // the pod sandbox binary (static)
	Registrar string // csi-node-driver-registrar (static)
}

// BuildNodeTools builds (or finds cached) the pause binary and
// node-driver-registrar.
func (b *Builder) BuildNodeTools(ctx context.Context) (*NodeTools, error) {
	pauseDir, err := b.build(ctx, modPause)
	if err != nil {
		return nil, err
	}
	reg, err := b.buildRegistrar(ctx)
	if err != nil {
		return nil, err
	}
	return &NodeTools{Pause: filepath.Join(pauseDir, "pause"), Registrar: reg}, nil
}

// buildRegistrar builds csi-node-driver-registrar from the vendored source
// tarball into the cache, keyed by the tarball's hash and the Go version.
func (b *Builder) buildRegistrar(ctx context.Context) (string, error) {
	tarball := filepath.Join(b.ThirdPartyDir(), "node-driver-registrar-"+RegistrarVersion+".tar.gz")
	sum, err := fileSHA256(tarball)
	if err != nil {
		return "", fmt.Errorf("node-driver-registrar source (set CSI_ENCDISK_THIRDPARTY to its directory): %w", err)
	}
	h := sha256.New()
	fmt.Fprintf(h, "%s\n%s/%s\n%s\n", runtime.Version(), runtime.GOOS, runtime.GOARCH, sum)
	key := hex.EncodeToString(h.Sum(nil))[:16]
	binDir := filepath.Join(b.CacheDir(), "bin", "registrar-"+key)
	bin := filepath.Join(binDir, "csi-node-driver-registrar")
	if _, err := os.Stat(filepath.Join(binDir, ".done")); err == nil {
		b.Logf("tools registrar: cached in %s", binDir)
		return bin, nil
	}
	if err := os.MkdirAll(filepath.Join(b.CacheDir(), "bin"), 0o755); err != nil {
		return "", err
	}
	unlock, err := lockFile(ctx, filepath.Join(b.CacheDir(), "bin", "registrar.lock"))
	if err != nil {
		return "", err
	}
	defer unlock()
	if _, err := os.Stat(filepath.Join(binDir, ".done")); err == nil {
		return bin, nil
	}
	tmp, err := os.MkdirTemp(filepath.Join(b.CacheDir(), "bin"), "registrar-tmp-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	src := filepath.Join(tmp, "src")
	if err := os.Mkdir(src, 0o755); err != nil {
		return "", err
	}
	start := time.Now()
	if out, err := exec.CommandContext(ctx, "tar", "-xzf", tarball, "-C", src).CombinedOutput(); err != nil {
		return "", fmt.Errorf("tools registrar: untar %s: %w: %s", tarball, err, out)
	}
	// The tarball holds one top directory (or the tree itself).
	modDir := src
	if entries, err := os.ReadDir(src); err == nil && len(entries) == 1 && entries[0].IsDir() {
		modDir = filepath.Join(src, entries[0].Name())
	}
	if _, err := os.Stat(filepath.Join(modDir, "vendor", "modules.txt")); err != nil {
		return "", fmt.Errorf("tools registrar: %s has no vendor/ directory: %w", tarball, err)
	}
	b.Logf("tools registrar: building node-driver-registrar %s from %s", RegistrarVersion, tarball)
	cmd := exec.CommandContext(ctx, "go", "build", "-mod=vendor", "-trimpath",
		"-ldflags", "-s -w -X main.version="+RegistrarVersion, "-o", filepath.Join(tmp, "csi-node-driver-registrar"),
		"./cmd/csi-node-driver-registrar")
	cmd.Dir = modDir
	cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=", "GOTOOLCHAIN=local", "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("tools registrar: go build: %w\n%s", err, out)
	}
	took := time.Since(start)
	b.Logf("tools registrar: built in %s", took.Round(time.Second))
	if err := os.RemoveAll(src); err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(tmp, "build-seconds"), []byte(fmt.Sprintf("%.1f\n", took.Seconds())), 0o644); err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(tmp, ".done"), nil, 0o644); err != nil {
		return "", err
	}
	_ = os.RemoveAll(binDir)
	if err := os.Rename(tmp, binDir); err != nil {
		return "", err
	}
	return bin, nil
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// Image is a local container image as an OCI archive that containerd imports.
type Image struct {
	Ref     string // e.g. localhost/csi-encdisk-k8s-pause:<key>
	Archive string // OCI archive (podman save --format oci-archive)
}

// Podman runs podman with the project's containers.conf (rlimits and runc for
// these machines).
func (b *Builder) Podman(ctx context.Context, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, "podman", args...)
	cmd.Env = append(os.Environ(), "CONTAINERS_CONF="+filepath.Join(b.Root, "scripts", "podman", "containers.conf"))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("podman %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// BaseImage is the Debian base that scripts/build-image.sh imports into podman
// (the csi-encdisk image's base); the test node's helper images build on it.
const BaseImage = "localhost/csi-encdisk-base:bookworm"

// buildImage builds name from a Containerfile and files (destination name in
// the build context -> source path on the host) unless an archive with the
// same content key is cached, and returns its archive. The key covers the
// Containerfile, the files' bytes and the base image's ID.
func (b *Builder) buildImage(ctx context.Context, name, containerfile string, files map[string]string) (*Image, error) {
	h := sha256.New()
	fmt.Fprintf(h, "%s\n%s\n", name, containerfile)
	if strings.Contains(containerfile, "FROM "+BaseImage) {
		id, err := b.Podman(ctx, "image", "inspect", "--format", "{{.Id}}", BaseImage)
		if err != nil {
			return nil, fmt.Errorf("image %s: base %s missing (scripts/build-image.sh makes it): %w", name, BaseImage, err)
		}
		fmt.Fprintf(h, "base %s\n", strings.TrimSpace(string(id)))
	}
	var names []string
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		sum, err := fileSHA256(files[n])
		if err != nil {
			return nil, fmt.Errorf("image %s: %w", name, err)
		}
		fmt.Fprintf(h, "%s %s\n", n, sum)
	}
	key := hex.EncodeToString(h.Sum(nil))[:16]
	img := &Image{
		Ref:     "localhost/csi-encdisk-k8s-" + name + ":" + key,
		Archive: filepath.Join(b.CacheDir(), "images", name+"-"+key+".oci.tar"),
	}
	if _, err := os.Stat(img.Archive); err == nil {
		b.Logf("image %s: cached %s", img.Ref, img.Archive)
		return img, nil
	}
	if err := os.MkdirAll(filepath.Dir(img.Archive), 0o755); err != nil {
		return nil, err
	}
	start := time.Now()
	ctxDir, err := os.MkdirTemp("", "encdisk-image-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(ctxDir)
	for _, n := range names {
		if err := copyFile(files[n], filepath.Join(ctxDir, n)); err != nil {
			return nil, fmt.Errorf("image %s: %w", name, err)
		}
	}
	if err := os.WriteFile(filepath.Join(ctxDir, "Containerfile"), []byte(containerfile), 0o644); err != nil {
		return nil, err
	}
	if _, err := b.Podman(ctx, "build", "--quiet", "--pull=never", "--network=none", "-t", img.Ref, "-f", filepath.Join(ctxDir, "Containerfile"), ctxDir); err != nil {
		return nil, fmt.Errorf("image %s: %w", name, err)
	}
	tmp := img.Archive + ".tmp"
	_ = os.Remove(tmp)
	if _, err := b.Podman(ctx, "save", "--quiet", "--format", "oci-archive", "-o", tmp, img.Ref); err != nil {
		return nil, fmt.Errorf("image %s: %w", name, err)
	}
	if err := os.Rename(tmp, img.Archive); err != nil {
		return nil, err
	}
	b.Logf("image %s: built and saved in %s", img.Ref, time.Since(start).Round(100*time.Millisecond))
	return img, nil
}

// NodeImages are the helper images of the test node.
type NodeImages struct {
	Pause     *Image // sandbox image: the pause binary, FROM scratch
	Registrar *Image // node-driver-registrar on the Debian base
	Workload  *Image // the Debian base plus fio, for the test pods
}

// BuildNodeImages builds (or finds cached) the node's helper images. The
// Debian base must exist in podman (scripts/build-image.sh imports it).
func (b *Builder) BuildNodeImages(ctx context.Context, tools *NodeTools) (*NodeImages, error) {
	var imgs NodeImages
	var err error
	imgs.Pause, err = b.buildImage(ctx, "pause", "FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT [\"/pause\"]\n",
		map[string]string{"pause": tools.Pause})
	if err != nil {
		return nil, err
	}
	imgs.Registrar, err = b.buildImage(ctx, "registrar",
		"FROM "+BaseImage+"\nCOPY csi-node-driver-registrar /usr/local/bin/csi-node-driver-registrar\n"+
			"ENTRYPOINT [\"/usr/local/bin/csi-node-driver-registrar\"]\n",
		map[string]string{"csi-node-driver-registrar": tools.Registrar})
	if err != nil {
		return nil, err
	}
	imgs.Workload, err = b.buildWorkloadImage(ctx)
	if err != nil {
		return nil, err
	}
	return &imgs, nil
}

// buildWorkloadImage makes the test pods' image: the Debian base (sh,
// coreutils, util-linux) plus the host's fio with every library ldd lists and
// the host's loader, under /opt/fio, run through /usr/local/bin/fio (so it
// does not depend on the base's glibc being the host's).
func (b *Builder) buildWorkloadImage(ctx context.Context) (*Image, error) {
	fio, err := exec.LookPath("fio")
	if err != nil {
		return nil, errors.New("image workload: fio not found (scripts/install-deps.sh installs it)")
	}
	out, err := exec.CommandContext(ctx, "ldd", fio).Output()
	if err != nil {
		return nil, fmt.Errorf("image workload: ldd %s: %w", fio, err)
	}
	files := map[string]string{"fio/fio": fio}
	loader := ""
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		var path string
		switch {
		case len(f) >= 3 && f[1] == "=>" && strings.HasPrefix(f[2], "/"):
			path = f[2]
		case len(f) >= 1 && strings.HasPrefix(f[0], "/"):
			path = f[0]
			loader = filepath.Base(path)
		default:
			continue
		}
		real, err := filepath.EvalSymlinks(path)
		if err != nil {
			return nil, fmt.Errorf("image workload: %w", err)
		}
		files["fio/lib/"+filepath.Base(path)] = real
	}
	if loader == "" {
		return nil, fmt.Errorf("image workload: no loader in ldd %s output", fio)
	}
	wrapper := filepath.Join(b.CacheDir(), "images", "fio-wrapper.sh")
	if err := os.MkdirAll(filepath.Dir(wrapper), 0o755); err != nil {
		return nil, err
	}
	script := "#!/bin/sh\nexec /opt/fio/lib/" + loader + " --library-path /opt/fio/lib /opt/fio/fio \"$@\"\n"
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		return nil, err
	}
	files["fio-wrapper"] = wrapper
	return b.buildImage(ctx, "workload",
		"FROM "+BaseImage+"\nCOPY fio /opt/fio\nCOPY fio-wrapper /usr/local/bin/fio\nCMD [\"/bin/sh\"]\n", files)
}

func copyFile(src, dst string) error {
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, st.Mode().Perm()|0o400)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
