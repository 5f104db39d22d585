{{/* Name prefix of every object. */}}
{{- define "encdisk.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "encdisk.labels" -}}
app.kubernetes.io/name: csi-encdisk
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component (controller | node). */}}
{{- define "encdisk.selector" -}}
app.kubernetes.io/name: csi-encdisk
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The csi-encdisk image. */}}
{{- define "encdisk.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The driver's --kms-endpoint. */}}
{{- define "encdisk.kmsEndpoint" -}}
{{- if eq .Values.kms.mode "builtin" -}}
unix:///kms/kms.sock
{{- else if eq .Values.kms.mode "external" -}}
unix:///kms-external/{{ base .Values.kms.external.socketPath }}
{{- else -}}
{{- fail (printf "kms.mode must be \"builtin\" or \"external\", not %q" .Values.kms.mode) -}}
{{- end -}}
{{- end -}}

{{/* The built-in KMS plugin's --keystore. */}}
{{- define "encdisk.keystore" -}}
{{- if eq .Values.kms.builtin.keystore "dir" -}}
dir:/var/lib/csi-encdisk-kms
{{- else if eq .Values.kms.builtin.keystore "pkcs11" -}}
pkcs11:{{ .Values.kms.builtin.pkcs11.module }}?token={{ .Values.kms.builtin.pkcs11.tokenLabel }}&pin-file=/etc/csi-encdisk-pkcs11/pin
{{- else -}}
{{- fail (printf "kms.builtin.keystore must be \"dir\" or \"pkcs11\", not %q" .Values.kms.builtin.keystore) -}}
{{- end -}}
{{- end -}}

{{/* The built-in KMS plugin sidecar (container list item). */}}
{{- define "encdisk.kmsPluginContainer" -}}
- name: kms-plugin
  image: {{ include "encdisk.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args:
    - kms-plugin
    - --listen=unix:///kms/kms.sock
    - --keystore={{ include "encdisk.keystore" . }}
    {{- if eq .Values.kms.builtin.keystore "dir" }}
    - --create-keystore
    {{- end }}
    - --region={{ .Values.region }}
  {{- with .Values.kms.builtin.pkcs11.extraEnv }}
  {{- if eq $.Values.kms.builtin.keystore "pkcs11" }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- end }}
  securityContext:
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities:
      drop: [ALL]
  volumeMounts:
    - name: kms-socket
      mountPath: /kms
    {{- if eq .Values.kms.builtin.keystore "dir" }}
    - name: kms-keys
      mountPath: /var/lib/csi-encdisk-kms
    {{- else }}
    - name: pkcs11-pin
      mountPath: /etc/csi-encdisk-pkcs11
      readOnly: true
    {{- with .Values.kms.builtin.pkcs11.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- end }}
{{- end -}}

{{/* Pod volumes of the KMS choice. */}}
{{- define "encdisk.kmsVolumes" -}}
{{- if eq .Values.kms.mode "builtin" }}
- name: kms-socket
  emptyDir: {}
{{- if eq .Values.kms.builtin.keystore "dir" }}
- name: kms-keys
  hostPath:
    path: {{ .Values.kms.builtin.dir.hostPath }}
    type: DirectoryOrCreate
{{- else }}
- name: pkcs11-pin
  secret:
    secretName: {{ .Values.kms.builtin.pkcs11.pinSecret }}
    defaultMode: 0400
    items:
      - key: pin
        path: pin
{{- with .Values.kms.builtin.pkcs11.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}
{{- else }}
- name: kms-external
  hostPath:
    path: {{ dir .Values.kms.external.socketPath }}
    type: Directory
{{- end }}
{{- end -}}

{{/* Driver container mount of the KMS socket. */}}
{{- define "encdisk.kmsMount" -}}
{{- if eq .Values.kms.mode "builtin" }}
- name: kms-socket
  mountPath: /kms
{{- else }}
- name: kms-external
  mountPath: /kms-external
{{- end }}
{{- end -}}

{{/* Security context of the sidecars: no privilege, no capability, read-only root. */}}
{{- define "encdisk.sidecarSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* Resources of the node driver container: the memory limit, unless set,
holds the driver, and maxVolumes engines when they run (mlocked) in this
container (engineHost.enabled false). */}}
{{- define "encdisk.nodeResources" -}}
{{- $res := deepCopy .Values.node.resources -}}
{{- $limits := default (dict) $res.limits -}}
{{- if and (not $limits.memory) .Values.engineHost.enabled -}}
{{- $_ := set $limits "memory" (printf "%dMi" (int .Values.node.memory.driverMiB)) -}}
{{- else if and (not $limits.memory) .Values.node.maxVolumes -}}
{{- $mem := add (int .Values.node.memory.driverMiB) (mul (int .Values.node.maxVolumes) (int .Values.node.memory.engineMiB)) -}}
{{- $_ := set $limits "memory" (printf "%dMi" $mem) -}}
{{- end -}}
{{- if $limits -}}
{{- $_ := set $res "limits" $limits -}}
{{- else -}}
{{- $_ := unset $res "limits" -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}


{{/* Resources of the engine host container: the memory limit, unless set,
holds the host and maxVolumes engines (they run, mlocked, in this container). */}}
{{- define "encdisk.engineHostResources" -}}
{{- $res := deepCopy .Values.engineHost.resources -}}
{{- $limits := default (dict) $res.limits -}}
{{- if and (not $limits.memory) .Values.node.maxVolumes -}}
{{- $mem := add (int .Values.node.memory.driverMiB) (mul (int .Values.node.maxVolumes) (int .Values.node.memory.engineMiB)) -}}
{{- $_ := set $limits "memory" (printf "%dMi" $mem) -}}
{{- end -}}
{{- if $limits -}}
{{- $_ := set $res "limits" $limits -}}
{{- else -}}
{{- $_ := unset $res "limits" -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}
