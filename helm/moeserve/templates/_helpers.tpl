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

{{/*
Expert worker groups with the expert group ids each one hosts: ids are handed out in list order,
so group ids 0..N-1 each live in exactly one worker group. Returns YAML: a list of
{name, first, count}.
*/}}
{{- define "moeserve.expertLayout" -}}
{{- $next := 0 }}
{{- $out := list }}
{{- $seen := dict }}
{{- range .Values.experts.workerGroups }}
{{- if hasKey $seen .name }}
{{- fail (printf "experts.workerGroups: the name %q is used twice; every worker group needs its own name" .name) }}
{{- end }}
{{- if eq .name "trunk" }}
{{- fail "experts.workerGroups: the name \"trunk\" is taken by the trunk worker group" }}
{{- end }}
{{- $_ := set $seen .name true }}
{{- $out = append $out (dict "name" .name "first" $next "count" (int .expertGroups)) }}
{{- $next = add $next (int .expertGroups) }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/* The number of expert groups in all (--expert-groups). */}}
{{- define "moeserve.expertGroupCount" -}}
{{- $n := 0 }}
{{- range .Values.experts.workerGroups }}{{ $n = add $n (int .expertGroups) }}{{ end }}
{{- $n }}
{{- end }}

{{/*
The Ray custom resources a pod of one expert worker group advertises, as the JSON string that
`ray start --resources` takes: one resource per expert group it hosts, so the autoscaler knows which
worker group turns a pending expert-group actor into a node.
*/}}
{{- define "moeserve.expertResources" -}}
{{- $res := dict }}
{{- $slots := .group.replicasPerPod | default 1 | int }}
{{- range $i := until (int .layout.count) }}
{{- $_ := set $res (replace "{group}" (toString (add $.layout.first $i)) $.ctx.Values.experts.resourceTemplate) $slots }}
{{- end }}
{{- /* KubeRay pastes the value into a shell command line: a double-quoted, escaped JSON string */}}
{{- printf "%q" (toJson $res) }}
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

{{/* gRPC health probe of the edge: native when plaintext, the mounted Python checker under TLS. */}}
{{- define "moeserve.grpcProbe" -}}
{{- $v := .ctx.Values }}
{{- if $v.tls.enabled }}
exec:
  command:
    - python
    - /etc/moeserve/probe/grpc_health_probe.py
    - --port={{ $v.server.port }}
    - --service={{ .service }}
    - --ca=/etc/moeserve/tls/{{ if $v.tls.caKey }}{{ $v.tls.caKey }}{{ else }}tls.crt{{ end }}
    - --server-name={{ $v.tls.serverName }}
    {{- if $v.tls.clientAuth }}
    - --cert=/etc/moeserve/tls/tls.crt
    - --key=/etc/moeserve/tls/tls.key
    {{- end }}
    {{- /* answer before the kubelet gives up on the probe */}}
    - --timeout={{ max 1 (sub (int .probe.timeoutSeconds) 1) }}
{{- else }}
grpc:
  port: {{ $v.server.port }}
  service: {{ .service | quote }}
{{- end }}
{{- with .probe }}
periodSeconds: {{ .periodSeconds }}
timeoutSeconds: {{ .timeoutSeconds }}
failureThreshold: {{ .failureThreshold }}
{{- end }}
{{- end }}

{{/*
Flags of `moeserve serve` on trunk pods, shell-quoted, on one line. The flags the chart relies on
are listed in the chart README.
*/}}
{{- define "moeserve.serveArgs" -}}
{{- $v := .Values }}
{{- $args := list }}
{{- if $v.model.path }}{{ $args = concat $args (list "--model" $v.model.path) }}{{ end }}
{{- $args = concat $args (list "--device" $v.server.device "--dtype" $v.server.dtype "--host" "0.0.0.0" "--port" (toString (int64 $v.server.port))) }}
{{- $args = concat $args (list "--max-num-seqs" (toString (int64 $v.server.maxNumSeqs)) "--max-num-batched-tokens" (toString (int64 $v.server.maxNumBatchedTokens))) }}
{{- if $v.server.maxModelLen }}{{ $args = concat $args (list "--max-model-len" (toString (int64 $v.server.maxModelLen))) }}{{ end }}
{{- $args = concat $args (list "--max-queued-requests" (toString (int64 $v.server.maxQueuedRequests)) "--max-message-bytes" (toString (int64 $v.server.maxMessageBytes)) "--grace" (toString $v.server.grace)) }}
{{- $args = concat $args (list "--expert-groups" (include "moeserve.expertGroupCount" .) "--transport" $v.server.transport "--expert-resource" $v.experts.resourceTemplate) }}
{{- if $v.autoscaling.enabled }}{{ $args = concat $args (list "--autoscaling-policy" "/etc/moeserve/autoscaling/policy.yaml") }}{{ end }}
{{- if $v.auth.enabled }}{{ $args = concat $args (list "--auth-token-file" "/etc/moeserve/auth/tokens") }}{{ end }}
{{- if $v.tls.enabled }}
{{- $args = concat $args (list "--tls-cert" "/etc/moeserve/tls/tls.crt" "--tls-key" "/etc/moeserve/tls/tls.key") }}
{{- if $v.tls.clientAuth }}{{ $args = concat $args (list "--tls-client-ca" "/etc/moeserve/tls/ca.crt") }}{{ end }}
{{- end }}
{{- if include "moeserve.metricsEnabled" . }}{{ $args = concat $args (list "--prometheus-port" (toString (int64 $v.metrics.port)) "--prometheus-host" "0.0.0.0") }}{{ end }}
{{- if $v.metrics.otlpEndpoint }}{{ $args = concat $args (list "--otlp-endpoint" $v.metrics.otlpEndpoint "--trace-sample-ratio" (toString $v.metrics.traceSampleRatio)) }}{{ end }}
{{- $args = concat $args $v.server.extraArgs }}
{{- $quoted := list }}
{{- range $args }}{{ $quoted = append $quoted (squote .) }}{{ end }}
{{- join " " $quoted }}
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

{{/* Checks across fields that values.schema.json cannot express; each names the field to fix. */}}
{{- define "moeserve.validate" -}}
{{- $name := include "moeserve.fullname" . }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) }}
{{- fail (printf "the RayCluster would be named %q, and KubeRay wants a DNS-1035 label (a-z first, then a-z, 0-9, '-'): set fullnameOverride" $name) }}
{{- end }}
{{- $groups := list (merge (dict "where" "trunk") .Values.trunk) }}
{{- range $i, $g := .Values.experts.workerGroups }}
{{- $groups = append $groups (merge (dict "where" (printf "experts.workerGroups[%d] (%s)" $i $g.name)) $g) }}
{{- end }}
{{- range $groups }}
{{- if gt (int .minReplicas) (int .maxReplicas) }}
{{- fail (printf "%s: minReplicas %d is above maxReplicas %d" .where (int .minReplicas) (int .maxReplicas)) }}
{{- end }}
{{- if or (lt (int .replicas) (int .minReplicas)) (gt (int .replicas) (int .maxReplicas)) }}
{{- fail (printf "%s: replicas %d is outside minReplicas..maxReplicas (%d..%d)" .where (int .replicas) (int .minReplicas) (int .maxReplicas)) }}
{{- end }}
{{- end }}
{{- if .Values.autoscaling.enabled }}
{{- include "moeserve.validatePolicyFits" . }}
{{- end }}
{{- if and .Values.tls.enabled .Values.tls.clientAuth (not .Values.tls.existingSecret) (not .Values.tls.clientCA) }}
{{- fail "tls.clientAuth: give tls.clientCA (PEM of the CA that signs client certificates) or a tls.existingSecret with ca.crt" }}
{{- end }}
{{- if and .Values.rbac.create (not .Values.serviceAccount.create) (not .Values.serviceAccount.name) }}
{{- fail "serviceAccount.name: needed when serviceAccount.create is false (the Role binds to it)" }}
{{- end }}
{{- end }}

{{/*
The policy's replica bounds must fit the worker groups: every replica of an expert group takes one
of the `replicasPerPod` slots of a pod of its worker group, and a trunk worker is a trunk pod.
Replicas the policy may ask for beyond that would wait for nodes forever. Defaults are those of
cluster/autoscaling/config.py (trunk 1..4, expert groups 1..8).
*/}}
{{- define "moeserve.validatePolicyFits" -}}
{{- $limits := .Values.autoscaling.policy.limits | default dict }}
{{- $trunkMax := dig "trunk" "max_replicas" 4 $limits | int }}
{{- if gt $trunkMax (int .Values.trunk.maxReplicas) }}
{{- fail (printf "autoscaling.policy.limits.trunk.max_replicas: %d is above trunk.maxReplicas %d; the policy could ask for trunk workers no pod can hold" $trunkMax (int .Values.trunk.maxReplicas)) }}
{{- end }}
{{- $groupMax := dig "expert_groups" "max_replicas" 8 $limits | int }}
{{- $perGroup := $limits.groups | default dict }}
{{- $total := include "moeserve.expertGroupCount" . | int }}
{{- range $name, $_ := $perGroup }}
{{- $ok := false }}
{{- range $i := until $total }}{{ if eq $name (printf "g%d" $i) }}{{ $ok = true }}{{ end }}{{ end }}
{{- if not $ok }}
{{- fail (printf "autoscaling.policy.limits.groups.%s: no such expert group; the groups are g0..g%d" $name (sub $total 1)) }}
{{- end }}
{{- end }}
{{- $layout := include "moeserve.expertLayout" . | fromYamlArray }}
{{- range $i, $g := $.Values.experts.workerGroups }}
{{- $l := index $layout $i }}
{{- $demand := 0 }}
{{- range $k := until (int $l.count) }}
{{- $gid := printf "g%d" (add $l.first $k) }}
{{- $demand = add $demand (dig $gid "max_replicas" $groupMax $perGroup | int) }}
{{- end }}
{{- $slots := mul (int $g.maxReplicas) ($g.replicasPerPod | default 1 | int) }}
{{- if gt (int $demand) (int $slots) }}
{{- fail (printf "experts.workerGroups[%d] (%s): its expert groups g%d..g%d may ask for %d replicas (autoscaling.policy.limits), but maxReplicas %d x replicasPerPod %d holds %d; raise maxReplicas or lower the policy's max_replicas" $i $g.name (int $l.first) (int (add $l.first $l.count -1)) (int $demand) (int $g.maxReplicas) ($g.replicasPerPod | default 1 | int) (int $slots)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* "true" when worker groups may carry idleTimeoutSeconds: KubeRay accepts them only from autoscaler v2. */}}
{{- define "moeserve.workerIdleTimeouts" -}}
{{- if and .Values.rayAutoscaler.enabled (eq .Values.rayAutoscaler.version "v2") }}true{{ end }}
{{- end }}
