{{/*
One expert worker group, called with (dict "ctx" $ "group" <values entry> "layout" <its expertLayout entry>):
its pods only run Ray and offer the resources of the expert groups they hold.
*/}}
{{- define "moeserve.expertGroup" -}}
{{- $ctx := .ctx }}
{{- $v := $ctx.Values }}
{{- $g := .group }}
{{- $groupLayout := .layout }}
{{- $idleTimeouts := include "moeserve.workerIdleTimeouts" $ctx -}}
- groupName: {{ $g.name }}
  replicas: {{ $g.replicas }}
  minReplicas: {{ $g.minReplicas }}
  maxReplicas: {{ $g.maxReplicas }}
  {{- if and $idleTimeouts (hasKey $g "idleTimeoutSeconds") }}
  idleTimeoutSeconds: {{ $g.idleTimeoutSeconds }}
  {{- end }}
  rayStartParams:
    # Expert groups {{ $groupLayout.first }}..{{ sub (add $groupLayout.first $groupLayout.count) 1 }} live here: a pending replica of one becomes a pod of this group.
    resources: {{ include "moeserve.expertResources" (dict "ctx" $ctx "group" $g "layout" $groupLayout) | quote }}
    {{- with $g.rayStartParams }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "moeserve.labels" $ctx | nindent 8 }}
        app.kubernetes.io/component: experts
        moeserve.io/worker-group: {{ $g.name }}
    spec:
      serviceAccountName: {{ include "moeserve.serviceAccountName" $ctx }}
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
          image: {{ include "moeserve.image" $ctx }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          command: ["/bin/bash", "-lc", "--"]
          args:
            {{- include "moeserve.rayStartArgs" $ctx | nindent 12 }}
          resources:
            {{- include "moeserve.gpuResources" (dict "resources" $g.resources "gpus" $g.gpus) | nindent 12 }}
          volumeMounts:
            {{- include "moeserve.commonMounts" $ctx | nindent 12 }}
          {{- with $v.securityContext }}
          securityContext:
            {{- toYaml . | nindent 12 }}
          {{- end }}
      volumes:
        {{- include "moeserve.commonVolumes" $ctx | nindent 8 }}
      {{- with $g.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}
