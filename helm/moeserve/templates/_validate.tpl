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
{{- if and (include "moeserve.workersMode" .) (hasPrefix "cuda" .Values.server.device) (eq (int .Values.trunk.gpus) 0) }}
{{- fail "trunk.gpus: 0, but in trunk.mode workers with server.device cuda every trunk worker asks Ray for one GPU of a trunk pod; give trunk pods GPUs or use server.device cpu" }}
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
of the `replicasPerPod` slots of a pod of its worker group, and a trunk worker is a trunk pod (in
trunk.mode workers literally: each worker asks for the one unit of trunk.rayResource a pod offers).
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
