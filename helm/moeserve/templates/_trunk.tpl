{{/*
The trunk worker group: each pod joins Ray (`ray start` returns), then runs `moeserve serve`, the
gRPC edge with the batcher, attention, KV cache and gating router. The gRPC Service selects these pods.
*/}}
{{- define "moeserve.trunkGroup" -}}
{{- $v := .Values }}
{{- $fullname := include "moeserve.fullname" . }}
{{- $idleTimeouts := include "moeserve.workerIdleTimeouts" . -}}
- groupName: trunk
  replicas: {{ $v.trunk.replicas }}
  minReplicas: {{ $v.trunk.minReplicas }}
  maxReplicas: {{ $v.trunk.maxReplicas }}
  {{- if $idleTimeouts }}
  idleTimeoutSeconds: {{ $v.trunk.idleTimeoutSeconds }}
  {{- end }}
  rayStartParams:
    # `ray start` returns once the node has joined, then the edge starts in the same container.
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
            - |
              ulimit -n 65536
              eval "$KUBERAY_GEN_RAY_START_CMD" || exit 1
              exec moeserve serve {{ include "moeserve.serveArgs" . | trim }}
          env:
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
            {{- toYaml . | nindent 12 }}
            {{- end }}
          ports:
            - {name: grpc, containerPort: {{ $v.server.port }}, protocol: TCP}
            {{- if include "moeserve.metricsEnabled" . }}
            - {name: metrics, containerPort: {{ $v.metrics.port }}, protocol: TCP}
            {{- end }}
          startupProbe:
            {{- include "moeserve.grpcProbe" (dict "ctx" . "service" "" "probe" $v.probes.startup) | trim | nindent 12 }}
          readinessProbe:
            {{- include "moeserve.grpcProbe" (dict "ctx" . "service" "moeserve.v1.Inference" "probe" $v.probes.readiness) | trim | nindent 12 }}
          livenessProbe:
            {{- include "moeserve.grpcProbe" (dict "ctx" . "service" "" "probe" $v.probes.liveness) | trim | nindent 12 }}
          resources:
            {{- include "moeserve.gpuResources" (dict "resources" $v.trunk.resources "gpus" $v.trunk.gpus) | nindent 12 }}
          volumeMounts:
            {{- include "moeserve.commonMounts" . | nindent 12 }}
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
          {{- with $v.securityContext }}
          securityContext:
            {{- toYaml . | nindent 12 }}
          {{- end }}
      volumes:
        {{- include "moeserve.commonVolumes" . | nindent 8 }}
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
