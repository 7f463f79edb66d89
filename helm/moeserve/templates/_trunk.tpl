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
