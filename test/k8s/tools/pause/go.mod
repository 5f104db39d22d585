// Module pause builds the pod sandbox ("pause") binary of the test/k8s node:
// a static program in a FROM-scratch image, imported into containerd as its
// sandbox_image, since no registry is reachable.
module github.com/csi-encdisk/csi-encdisk/test/k8s/tools/pause

go 1.26.0
