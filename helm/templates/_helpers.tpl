{{/* Names, labels and the model wiring shared by the templates. */}}

{{- define "moe-embed.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "moe-embed.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "moe-embed.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "moe-embed.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moe-embed.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "moe-embed.labels" -}}
helm.sh/chart: {{ include "moe-embed.chart" . }}
{{ include "moe-embed.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "moe-embed.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "moe-embed.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "moe-embed.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Where the model volume is mounted (hub and existingClaim sources). */}}
{{- define "moe-embed.modelMountPath" -}}
/models
{{- end }}

{{/* The hub bundle's directory name: a new id, revision, MoE mode or precision gets a new
export (fp32 keeps the name it had before precisions existed, so its PVCs stay valid). */}}
{{- define "moe-embed.hubBundleDir" -}}
{{- $h := .Values.model.hub }}
{{- $p := ternary "" (printf "--%s" .Values.model.precision) (eq .Values.model.precision "fp32") }}
{{- printf "%s--%s--%s%s" $h.id (default "default" $h.revision) $h.moeMode $p | replace "/" "_" | replace ":" "_" }}
{{- end }}

{{/* MOE_EMBED_BUNDLE for the chosen source; empty for the demo model. */}}
{{- define "moe-embed.bundlePath" -}}
{{- if eq .Values.model.source "hub" }}
{{- printf "%s/%s" (include "moe-embed.modelMountPath" .) (include "moe-embed.hubBundleDir" .) }}
{{- else if eq .Values.model.source "existingClaim" }}
{{- printf "%s/%s" (include "moe-embed.modelMountPath" .) (trimPrefix "/" .Values.model.existingClaim.bundlePath) }}
{{- else if eq .Values.model.source "image" }}
{{- .Values.model.image.bundlePath }}
{{- end }}
{{- end }}

{{/* Resources per precision for one worker, from benchmarks/README.md's "Footprint and start time"
(benchmarks/footprint.py): request = idle PSS rounded up, limit = peak under load + margin. */}}
{{- define "moe-embed.resourcePresets" -}}
fp32:
  requests: {cpu: "2", memory: 1536Mi}
  limits: {cpu: "2", memory: 4Gi}
int8:
  requests: {cpu: "2", memory: 768Mi}
  limits: {cpu: "2", memory: 2Gi}
int4:
  requests: {cpu: "2", memory: 768Mi}
  limits: {cpu: "2", memory: 2Gi}
{{- end }}

{{/* The server container's resources: the chosen preset, else .Values.resources. */}}
{{- define "moe-embed.resources" -}}
{{- if .Values.resourcesPreset }}
{{- get (include "moe-embed.resourcePresets" . | fromYaml) .Values.resourcesPreset | toYaml }}
{{- else }}
{{- toYaml .Values.resources }}
{{- end }}
{{- end }}

{{- define "moe-embed.hubClaimName" -}}
{{- default (printf "%s-model" (include "moe-embed.fullname" .)) .Values.model.hub.persistence.existingClaim }}
{{- end }}

{{/* Name of the Secret holding the hub token; empty when no token is configured. */}}
{{- define "moe-embed.hubTokenSecret" -}}
{{- $t := .Values.model.hub.token }}
{{- if $t.existingSecret }}
{{- $t.existingSecret }}
{{- else if $t.value }}
{{- printf "%s-hub-token" (include "moe-embed.fullname" .) }}
{{- end }}
{{- end }}

{{/* The port the kubelet's gRPC probes ask: with TLS on, the plaintext health port. */}}
{{- define "moe-embed.probePort" -}}
{{- if .Values.tls.enabled }}{{ .Values.server.healthPort }}{{ else }}{{ .Values.server.port }}{{ end }}
{{- end }}

{{/* Fails the render on values that would deploy something broken. */}}
{{- define "moe-embed.validate" -}}
{{- $src := .Values.model.source }}
{{- if not (has $src (list "demo" "hub" "existingClaim" "image")) }}
{{- fail (printf "model.source must be demo, hub, existingClaim or image, not %q" $src) }}
{{- end }}
{{- if and (eq $src "image") (not (hasPrefix "/" .Values.model.image.bundlePath)) }}
{{- fail "model.image.bundlePath must be an absolute path inside the image" }}
{{- end }}
{{- if and .Values.resourcesPreset (not (has .Values.resourcesPreset (list "fp32" "int8" "int4"))) }}
{{- fail (printf "resourcesPreset must be fp32, int8, int4 or empty, not %q" .Values.resourcesPreset) }}
{{- end }}
{{- if and (eq $src "existingClaim") (not .Values.model.existingClaim.claimName) }}
{{- fail "model.existingClaim.claimName is required when model.source is existingClaim" }}
{{- end }}
{{- if and (eq $src "hub") (not .Values.model.hub.id) }}
{{- fail "model.hub.id is required when model.source is hub" }}
{{- end }}
{{- if not (has .Values.model.hub.storage (list "emptyDir" "persistentVolumeClaim")) }}
{{- fail (printf "model.hub.storage must be emptyDir or persistentVolumeClaim, not %q" .Values.model.hub.storage) }}
{{- end }}
{{- if not (has .Values.model.hub.moeMode (list "routed" "all-experts")) }}
{{- fail (printf "model.hub.moeMode must be routed or all-experts, not %q" .Values.model.hub.moeMode) }}
{{- end }}
{{- if not (has .Values.model.precision (list "fp32" "int8" "int4")) }}
{{- fail (printf "model.precision must be fp32, int8 or int4, not %q" .Values.model.precision) }}
{{- end }}
{{- if and (eq .Values.model.hub.moeMode "all-experts") (ne .Values.model.precision "fp32") }}
{{- fail "model.hub.moeMode all-experts is exported in fp32 only: set model.precision=fp32" }}
{{- end }}
{{- $needed := add (int .Values.preStopSleepSeconds) (int .Values.server.drainGraceSeconds) }}
{{- if le (int .Values.terminationGracePeriodSeconds) $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds + server.drainGraceSeconds (%d)" (int .Values.terminationGracePeriodSeconds) $needed) }}
{{- end }}
{{- $ports := dict }}
{{- $_ := set $ports "server.port" (int .Values.server.port) }}
{{- if ne (int .Values.server.httpPort) 0 }}{{ $_ := set $ports "server.httpPort" (int .Values.server.httpPort) }}{{ end }}
{{- if .Values.tls.enabled }}{{ $_ := set $ports "server.healthPort" (int .Values.server.healthPort) }}{{ end }}
{{- if .Values.metrics.enabled }}{{ $_ := set $ports "metrics.port" (int .Values.metrics.port) }}{{ end }}
{{- range $a := keys $ports | sortAlpha }}
{{- range $b := keys $ports | sortAlpha }}
{{- if and (lt $a $b) (eq (get $ports $a) (get $ports $b)) }}
{{- fail (printf "%s and %s must differ (both %d)" $a $b (get $ports $a)) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) }}
{{- fail "tls.secretName is required when tls.enabled (a kubernetes.io/tls Secret: tls.crt, tls.key, and ca.crt for clientAuth)" }}
{{- end }}
{{- if and .Values.tls.clientAuth (not .Values.tls.enabled) }}
{{- fail "tls.clientAuth needs tls.enabled" }}
{{- end }}
{{- if and .Values.apiKeys.enabled (not .Values.apiKeys.existingSecret) }}
{{- fail "apiKeys.existingSecret is required when apiKeys.enabled (a Secret whose apiKeys.secretKey holds one key per line)" }}
{{- end }}
{{- $ratio := .Values.tracing.sampleRatio | float64 }}
{{- if or (lt $ratio 0.0) (gt $ratio 1.0) }}
{{- fail (printf "tracing.sampleRatio must be between 0 and 1, not %v" .Values.tracing.sampleRatio) }}
{{- end }}
{{- $a := .Values.autoscaling }}
{{- if and $a.enabled (not $a.keda.enabled) (le (int $a.targetCPUUtilizationPercentage) 0) (not $a.queueDepth.enabled) }}
{{- fail "autoscaling needs a metric: targetCPUUtilizationPercentage above 0, or queueDepth.enabled" }}
{{- end }}
{{- if and $a.keda.enabled (not $a.keda.serverAddress) }}
{{- fail "autoscaling.keda.serverAddress is required when autoscaling.keda.enabled (the Prometheus that scrapes the pods)" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled" }}
{{- end }}
{{- end }}
