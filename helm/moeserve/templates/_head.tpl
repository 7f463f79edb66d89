{{/*
The head group: GCS, dashboard and the autoscaler sidecar KubeRay adds; it schedules no model work.
In trunk.mode workers its container also runs the gRPC edge (`moeserve serve --trunk-workers`) after
`ray start --head` returns: the edge, controller, admin API and autoscaling policy live here and the
trunk runs in trunk workers on the trunk pods.
*/}}
{{- define "moeserve.headGroup" -}}
{{- $v := .Values -}}
{{- $workers := include "moeserve.workersMode" . -}}
rayStartParams:
  # Nothing is scheduled on the head: model work goes to the trunk and expert groups.
  num-cpus: "0"
  dashboard-host: 0.0.0.0
  {{- if $workers }}
  # `ray start` returns once the head is up, then the edge starts in the same container.
  block: "false"
  {{- end }}
  {{- with $v.head.rayStartParams }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
template:
  metadata:
    labels:
      {{- include "moeserve.labels" . | nindent 6 }}
      app.kubernetes.io/component: head
    {{- if $workers }}
    annotations:
      checksum/autoscaling: {{ include (print $.Template.BasePath "/configmap-autoscaling.yaml") . | sha256sum }}
      {{- with $v.head.podAnnotations }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- else }}
    {{- with $v.head.podAnnotations }}
    annotations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- end }}
  spec:
    serviceAccountName: {{ include "moeserve.serviceAccountName" . }}
    # The autoscaler sidecar talks to the Kubernetes API; nothing else does.
    automountServiceAccountToken: {{ $v.rayAutoscaler.enabled }}
    {{- if $workers }}
    terminationGracePeriodSeconds: {{ add (int $v.server.grace) 15 }}
    {{- end }}
    {{- with $v.imagePullSecrets }}
    imagePullSecrets:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $v.podSecurityContext }}
    securityContext:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    containers:
      - name: ray-head
        image: {{ include "moeserve.image" . }}
        imagePullPolicy: {{ $v.image.pullPolicy }}
        command: ["/bin/bash", "-lc", "--"]
        args:
          {{- if $workers }}
          {{- include "moeserve.edgeScript" . | nindent 10 }}
          {{- else }}
          {{- include "moeserve.rayStartArgs" . | nindent 10 }}
          {{- end }}
        {{- if $workers }}
        env:
          {{- include "moeserve.edgeEnv" . | nindent 10 }}
        {{- end }}
        ports:
          - {name: gcs-server, containerPort: 6379}
          - {name: dashboard, containerPort: 8265}
          - {name: client, containerPort: 10001}
          {{- if $workers }}
          {{- include "moeserve.edgePorts" . | nindent 10 }}
          {{- end }}
        {{- if $workers }}
        {{- include "moeserve.edgeProbes" . | nindent 8 }}
        {{- end }}
        resources:
          {{- toYaml $v.head.resources | nindent 10 }}
        volumeMounts:
          {{- if $workers }}
          {{- include "moeserve.commonMounts" . | nindent 10 }}
          {{- with include "moeserve.edgeMounts" . }}{{ . | trim | nindent 10 }}{{ end }}
          {{- else }}
          - name: dshm
            mountPath: /dev/shm
          {{- end }}
        {{- with $v.securityContext }}
        securityContext:
          {{- toYaml . | nindent 10 }}
        {{- end }}
    volumes:
      {{- if $workers }}
      {{- include "moeserve.commonVolumes" . | nindent 6 }}
      {{- with include "moeserve.edgeVolumes" . }}{{ . | trim | nindent 6 }}{{ end }}
      {{- else }}
      - name: dshm
        emptyDir:
          medium: Memory
          {{- with $v.sharedMemorySize }}
          sizeLimit: {{ . }}
          {{- end }}
      {{- end }}
    {{- with $v.head.nodeSelector }}
    nodeSelector:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $v.head.tolerations }}
    tolerations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $v.head.affinity }}
    affinity:
      {{- toYaml . | nindent 6 }}
    {{- end }}
{{- end }}
