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
