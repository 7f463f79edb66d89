{{/*
The head group: GCS, dashboard and the autoscaler sidecar KubeRay adds; it schedules no model work.
*/}}
{{- define "moeserve.headGroup" -}}
{{- $v := .Values -}}
rayStartParams:
  # Nothing is scheduled on the head: model work goes to the trunk and expert groups.
  num-cpus: "0"
  dashboard-host: 0.0.0.0
  {{- with $v.head.rayStartParams }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
template:
  metadata:
    labels:
      {{- include "moeserve.labels" . | nindent 6 }}
      app.kubernetes.io/component: head
    {{- with $v.head.podAnnotations }}
    annotations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
  spec:
    serviceAccountName: {{ include "moeserve.serviceAccountName" . }}
    # The autoscaler sidecar talks to the Kubernetes API; nothing else does.
    automountServiceAccountToken: {{ $v.rayAutoscaler.enabled }}
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
          {{- include "moeserve.rayStartArgs" . | nindent 10 }}
        ports:
          - {name: gcs-server, containerPort: 6379}
          - {name: dashboard, containerPort: 8265}
          - {name: client, containerPort: 10001}
        resources:
          {{- toYaml $v.head.resources | nindent 10 }}
        volumeMounts:
          - name: dshm
            mountPath: /dev/shm
        {{- with $v.securityContext }}
        securityContext:
          {{- toYaml . | nindent 10 }}
        {{- end }}
    volumes:
      - name: dshm
        emptyDir:
          medium: Memory
          {{- with $v.sharedMemorySize }}
          sizeLimit: {{ . }}
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
