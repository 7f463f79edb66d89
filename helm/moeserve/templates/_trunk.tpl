{{/*
The trunk worker group. trunk.mode edge: each pod joins Ray (`ray start` returns), then runs
`moeserve serve`, the gRPC edge with the batcher, attention, KV cache and gating router; the gRPC
Service selects these pods. trunk.mode workers: each pod only runs Ray (`ray start --block`, like the
expert pods) and offers one unit of trunk.rayResource and its GPUs, for one trunk worker of the edge
on the head (moeserve.trunkWorkerGroup).
*/}}
{{- define "moeserve.trunkGroup" -}}
{{- if include "moeserve.workersMode" . }}
{{- include "moeserve.trunkWorkerGroup" . }}
{{- else }}
{{- $v := .Values }}
{{- $idleTimeouts := include "moeserve.workerIdleTimeouts" . -}}
- groupName: trunk
  replicas: {{ $v.trunk.replicas }}
  minReplicas: {{ $v.trunk.minReplicas }}
  maxReplicas: {{ $v.trunk.maxReplicas }}
  {{- if $idleTimeouts }}
  idleTimeoutSeconds: {{ $v.trunk.idleTimeoutSeconds }}
  {{- end }}
  rayStartParams:
    # `ray start` must return once the node has joined: the edge starts next in the same container.
    # KubeRay 1.1+ puts --block in the generated command anyway; moeserve.edgeScript drops it.
    block: "false"
    # The trunk's GPUs belong to the edge process, never to Ray actors.
    num-gpus: "0"
    resources: {{ printf "%q" (toJson (dict $v.trunk.rayResource 1)) | quote }}
    {{- with $v.trunk.rayStartParams }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "moeserve.labels" . | nindent 8 }}
        app.kubernetes.io/component: trunk
        moeserve.io/worker-group: trunk
      annotations:
        checksum/autoscaling: {{ include (print $.Template.BasePath "/configmap-autoscaling.yaml") . | sha256sum }}
        {{- with $v.trunk.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "moeserve.serviceAccountName" . }}
      automountServiceAccountToken: false
      terminationGracePeriodSeconds: {{ add (int $v.server.grace) 15 }}
      {{- with $v.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.podSecurityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-worker
          image: {{ include "moeserve.image" . }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          command: ["/bin/bash", "-lc", "--"]
          args:
            {{- include "moeserve.edgeScript" . | nindent 12 }}
          env:
            {{- include "moeserve.edgeEnv" . | nindent 12 }}
          ports:
            {{- include "moeserve.edgePorts" . | nindent 12 }}
          {{- include "moeserve.edgeProbes" . | nindent 10 }}
          resources:
            {{- include "moeserve.gpuResources" (dict "resources" $v.trunk.resources "gpus" $v.trunk.gpus) | nindent 12 }}
          volumeMounts:
            {{- include "moeserve.commonMounts" . | nindent 12 }}
            {{- with include "moeserve.edgeMounts" . }}{{ . | trim | nindent 12 }}{{ end }}
          {{- with $v.securityContext }}
          securityContext:
            {{- toYaml . | nindent 12 }}
          {{- end }}
      volumes:
        {{- include "moeserve.commonVolumes" . | nindent 8 }}
        {{- with include "moeserve.edgeVolumes" . }}{{ . | trim | nindent 8 }}{{ end }}
      {{- with $v.trunk.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.trunk.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.trunk.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}
{{- end }}

{{/*
The trunk worker group in trunk.mode workers: plain Ray workers, like the expert pods. Each pod offers
one unit of trunk.rayResource and trunk.gpus GPUs; a trunk worker (serve --trunk-workers on the head)
asks for one unit and, on CUDA, one GPU, so a worker no pod can take is node demand for this group.
*/}}
{{- define "moeserve.trunkWorkerGroup" -}}
{{- $v := .Values }}
{{- $idleTimeouts := include "moeserve.workerIdleTimeouts" . -}}
- groupName: trunk
  replicas: {{ $v.trunk.replicas }}
  minReplicas: {{ $v.trunk.minReplicas }}
  maxReplicas: {{ $v.trunk.maxReplicas }}
  {{- if $idleTimeouts }}
  idleTimeoutSeconds: {{ $v.trunk.idleTimeoutSeconds }}
  {{- end }}
  rayStartParams:
    # One trunk worker per pod: it asks for one unit of {{ $v.trunk.rayResource }} (serve --trunk-resource) and, on CUDA, one GPU.
    num-gpus: {{ $v.trunk.gpus | int | toString | quote }}
    resources: {{ printf "%q" (toJson (dict $v.trunk.rayResource 1)) | quote }}
    {{- with $v.trunk.rayStartParams }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "moeserve.labels" . | nindent 8 }}
        app.kubernetes.io/component: trunk
        moeserve.io/worker-group: trunk
      {{- with $v.trunk.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "moeserve.serviceAccountName" . }}
      automountServiceAccountToken: false
      {{- with $v.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.podSecurityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-worker
          image: {{ include "moeserve.image" . }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          command: ["/bin/bash", "-lc", "--"]
          args:
            {{- include "moeserve.rayStartArgs" . | nindent 12 }}
          {{- with $v.server.env }}
          # The trunk workers' processes inherit the environment of `ray start`.
          env:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          resources:
            {{- include "moeserve.gpuResources" (dict "resources" $v.trunk.resources "gpus" $v.trunk.gpus) | nindent 12 }}
          volumeMounts:
            {{- include "moeserve.commonMounts" . | nindent 12 }}
          {{- with $v.securityContext }}
          securityContext:
            {{- toYaml . | nindent 12 }}
          {{- end }}
      volumes:
        {{- include "moeserve.commonVolumes" . | nindent 8 }}
      {{- with $v.trunk.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.trunk.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.trunk.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}

{{/*
What the container running `moeserve serve` (the gRPC edge) carries, wherever it runs: the trunk pods
in trunk.mode edge, the head in trunk.mode workers. edgeEnv, edgePorts, edgeMounts and edgeVolumes are
list items; edgeProbes are container fields.
*/}}
{{- define "moeserve.edgeEnv" -}}
{{- $v := .Values -}}
# The edge joins the Ray cluster through the node `ray start` just brought up.
- name: RAY_ADDRESS
  value: auto
- name: MOESERVE_ADMIN_PORT
  value: {{ if $v.admin.enabled }}{{ $v.admin.port | quote }}{{ else }}"off"{{ end }}
{{- if and $v.admin.enabled (or $v.admin.existingSecret $v.admin.tokens) }}
- name: MOESERVE_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "moeserve.adminSecretName" . }}
      key: {{ $v.admin.secretKey }}
{{- end }}
{{- with $v.server.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "moeserve.edgePorts" -}}
{{- $v := .Values -}}
- {name: grpc, containerPort: {{ $v.server.port }}, protocol: TCP}
{{- if $v.server.httpPort }}
- {name: http, containerPort: {{ $v.server.httpPort }}, protocol: TCP}
{{- end }}
{{- if include "moeserve.metricsEnabled" . }}
- {name: metrics, containerPort: {{ $v.metrics.port }}, protocol: TCP}
{{- end }}
{{- end }}

{{- define "moeserve.edgeProbes" -}}
{{- $v := .Values -}}
startupProbe:
  {{- include "moeserve.grpcProbe" (dict "ctx" . "service" "" "probe" $v.probes.startup) | trim | nindent 2 }}
readinessProbe:
  {{- include "moeserve.grpcProbe" (dict "ctx" . "service" "moeserve.v1.Inference" "probe" $v.probes.readiness) | trim | nindent 2 }}
livenessProbe:
  {{- include "moeserve.grpcProbe" (dict "ctx" . "service" "" "probe" $v.probes.liveness) | trim | nindent 2 }}
{{- end }}

{{- define "moeserve.edgeMounts" -}}
{{- $v := .Values -}}
{{- if $v.autoscaling.enabled }}
- name: autoscaling
  mountPath: /etc/moeserve/autoscaling
  readOnly: true
{{- end }}
{{- if $v.auth.enabled }}
- name: auth
  mountPath: /etc/moeserve/auth
  readOnly: true
{{- end }}
{{- if $v.tls.enabled }}
- name: tls
  mountPath: /etc/moeserve/tls
  readOnly: true
- name: probe
  mountPath: /etc/moeserve/probe
  readOnly: true
{{- end }}
{{- end }}

{{- define "moeserve.edgeVolumes" -}}
{{- $v := .Values -}}
{{- $fullname := include "moeserve.fullname" . -}}
{{- if $v.autoscaling.enabled }}
- name: autoscaling
  configMap:
    name: {{ $fullname }}-autoscaling
{{- end }}
{{- if $v.auth.enabled }}
- name: auth
  secret:
    secretName: {{ include "moeserve.authSecretName" . }}
    items:
      - {key: {{ $v.auth.secretKey }}, path: tokens}
{{- end }}
{{- if $v.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "moeserve.tlsSecretName" . }}
- name: probe
  configMap:
    name: {{ $fullname }}-probe
{{- end }}
{{- end }}

{{/*
Flags of `moeserve serve` (on trunk pods, or on the head in trunk.mode workers), shell-quoted, on one line. The flags the chart relies on
are listed in the chart README.
*/}}
{{- define "moeserve.serveArgs" -}}
{{- $v := .Values }}
{{- $args := list }}
{{- if $v.model.path }}{{ $args = concat $args (list "--model" $v.model.path) }}{{ end }}
{{- $args = concat $args (list "--device" $v.server.device "--dtype" $v.server.dtype "--host" "0.0.0.0" "--port" (toString (int64 $v.server.port))) }}
{{- $args = concat $args (list "--max-num-seqs" (toString (int64 $v.server.maxNumSeqs)) "--max-num-batched-tokens" (toString (int64 $v.server.maxNumBatchedTokens)) "--batch-wait-ms" (toString $v.server.batchWaitMs) "--prefill-hold-ms" (toString $v.server.prefillHoldMs)) }}
{{- if not $v.server.prefixCaching }}{{ $args = append $args "--no-prefix-caching" }}{{ end }}
{{- if $v.server.speculativeTokens }}{{ $args = concat $args (list "--speculative-tokens" (toString (int64 $v.server.speculativeTokens)) "--ngram-min" (toString (int64 $v.server.ngramMin)) "--ngram-max" (toString (int64 $v.server.ngramMax))) }}{{ end }}
{{- $args = concat $args (list "--tool-call-format" $v.server.toolCallFormat "--reasoning-content" $v.server.reasoningContent) }}
{{- if $v.server.httpPort }}{{ $args = concat $args (list "--http-port" (toString (int64 $v.server.httpPort))) }}{{ end }}
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
{{- if include "moeserve.workersMode" . }}{{ $args = concat $args (list "--trunk-workers" (toString (int64 $v.trunk.replicas)) "--trunk-resource" $v.trunk.rayResource "--trunk-routing" $v.trunk.routing) }}{{ end }}
{{- $args = concat $args $v.server.extraArgs }}
{{- $quoted := list }}
{{- range $args }}{{ $quoted = append $quoted (squote .) }}{{ end }}
{{- join " " $quoted }}
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
