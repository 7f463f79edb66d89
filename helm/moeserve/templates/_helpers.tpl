{{/*
Names, labels and the few derived values every template shares.
*/}}

{{- define "moeserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's object name. KubeRay derives service and pod names from the RayCluster name and adds
suffixes of its own, so it is kept to 40 characters.
*/}}
{{- define "moeserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else if contains (include "moeserve.name" .) .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "moeserve.name" .) | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "moeserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "moeserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moeserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "moeserve.labels" -}}
helm.sh/chart: {{ include "moeserve.chart" . }}
{{ include "moeserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: moeserve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component (head, trunk, experts); call with (dict "ctx" $ "component" "trunk"). */}}
{{- define "moeserve.componentSelector" -}}
{{ include "moeserve.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "moeserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "moeserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "moeserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Secret holding the bearer tokens (one a line under auth.secretKey). */}}
{{- define "moeserve.authSecretName" -}}
{{- default (printf "%s-auth" (include "moeserve.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/* Secret holding the admin tokens, comma separated, under admin.secretKey. */}}
{{- define "moeserve.adminSecretName" -}}
{{- default (printf "%s-admin" (include "moeserve.fullname" .)) .Values.admin.existingSecret }}
{{- end }}

{{/* Secret holding tls.crt, tls.key and, for client certificates, ca.crt. */}}
{{- define "moeserve.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "moeserve.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{- define "moeserve.metricsEnabled" -}}
{{- if or .Values.metrics.enabled .Values.metrics.serviceMonitor.enabled .Values.metrics.prometheusRule.enabled }}true{{- end }}
{{- end }}

{{/* Volumes and mounts shared by every Ray container: shared memory for the object store, the model. */}}
{{- define "moeserve.commonVolumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    {{- with .Values.sharedMemorySize }}
    sizeLimit: {{ . }}
    {{- end }}
{{- if .Values.model.volume }}
- name: model
  {{- toYaml .Values.model.volume | nindent 2 }}
{{- end }}
{{- end }}

{{- define "moeserve.commonMounts" -}}
- name: dshm
  mountPath: /dev/shm
{{- if .Values.model.volume }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
Container command of the head and expert pods: KubeRay's generated `ray start --block`. The cluster
carries ray.io/overwrite-container-cmd (the trunk runs the edge after `ray start`), so every pod
states its command; eval because the generated command holds shell quoting (--resources JSON).
*/}}
{{- define "moeserve.rayStartArgs" -}}
- ulimit -n 65536; eval "exec $KUBERAY_GEN_RAY_START_CMD"
{{- end }}

{{/*
Container script of a pod that runs the edge after joining Ray: `ray start` must return, but KubeRay
1.1+ (kuberay#1718) puts --block in the generated command whatever rayStartParams say, so it is
dropped here; then `moeserve serve`.
*/}}
{{- define "moeserve.edgeScript" -}}
- |
  ulimit -n 65536
  start=" $KUBERAY_GEN_RAY_START_CMD "
  eval "${start// --block / }" || exit 1
  exec moeserve serve {{ include "moeserve.serveArgs" . | trim }}
{{- end }}

{{/* Container resources with nvidia.com/gpu added to limits (and requests) when gpus > 0. */}}
{{- define "moeserve.gpuResources" -}}
{{- $res := deepCopy (default dict .resources) }}
{{- if gt (int .gpus) 0 }}
{{- $limits := merge (dict "nvidia.com/gpu" (int .gpus)) (default dict $res.limits) }}
{{- $requests := merge (dict "nvidia.com/gpu" (int .gpus)) (default dict $res.requests) }}
{{- $_ := set $res "limits" $limits }}
{{- $_ := set $res "requests" $requests }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* "true" when worker groups may carry idleTimeoutSeconds: KubeRay accepts them only from autoscaler v2. */}}
{{- define "moeserve.workerIdleTimeouts" -}}
{{- if and .Values.rayAutoscaler.enabled (eq .Values.rayAutoscaler.version "v2") }}true{{ end }}
{{- end }}

{{/* "true" in trunk.mode workers: the edge runs on the head and trunk pods are plain Ray workers. */}}
{{- define "moeserve.workersMode" -}}
{{- if eq (.Values.trunk.mode | default "edge") "workers" }}true{{ end }}
{{- end }}

{{/* The component whose pods run `moeserve serve` (the gRPC edge): trunk, or head in workers mode. */}}
{{- define "moeserve.edgeComponent" -}}
{{- if include "moeserve.workersMode" . }}head{{ else }}trunk{{ end }}
{{- end }}
