{{/* Chart name, truncated to 63 characters (a label value). */}}
{{- define "sluice.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped name of the chart's objects: "<release>" when it already contains the chart
name, else "<release>-sluice". */}}
{{- define "sluice.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sluice.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sluice.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "sluice.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "sluice.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sluice
{{- end -}}

{{- define "sluice.serviceAccountName" -}}
{{- default (include "sluice.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* The webhook Service: "<fullname>-webhook". */}}
{{- define "sluice.webhookServiceName" -}}
{{- printf "%s-webhook" (include "sluice.fullname" . | trunc 55 | trimSuffix "-") -}}
{{- end -}}

{{- define "sluice.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The ClusterKopfPeering the replicas coordinate through: peering.name, else "<fullname>". */}}
{{- define "sluice.peeringName" -}}
{{- default (include "sluice.fullname" .) .Values.peering.name -}}
{{- end -}}

{{/* The Secret holding the self-signed webhook certificate shared by the replicas. */}}
{{- define "sluice.webhookCertSecretName" -}}
{{- printf "%s-webhook-tls" (include "sluice.fullname" .) -}}
{{- end -}}

{{/* Labels of one component's objects: (dict "ctx" $ "component" "redis"). The operator's keep
sluice.labels / sluice.selectorLabels (their selector cannot change on upgrade). */}}
{{- define "sluice.componentSelectorLabels" -}}
app.kubernetes.io/name: {{ include "sluice.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "sluice.componentLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
{{ include "sluice.componentSelectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: sluice
{{- end -}}

{{/* The in-chart Redis (redis.enabled): its StatefulSet, Service, ConfigMap and the Secret
with its generated password and URL all carry this name; at most 52 characters, as a
StatefulSet's name must leave room for its controller-revision-hash label. */}}
{{- define "sluice.redisName" -}}
{{- printf "%s-redis" (include "sluice.fullname" . | trunc 46 | trimSuffix "-") -}}
{{- end -}}

{{/* The in-chart Redis's URL without its password: a Service name that resolves from every
namespace (the injected sidecars run in the applications' ones). */}}
{{- define "sluice.redisAddress" -}}
{{- printf "%s.%s.svc:6379" (include "sluice.redisName" .) .Release.Namespace -}}
{{- end -}}

{{/* The env entry NAME = the Redis URL for a pod of the release namespace (the operator, the
collector): from the in-chart Redis's Secret, from externalRedis.existingSecret, or
externalRedis.url as a value. Called with (dict "ctx" $ "name" "SLUICE_OPERATOR_REDIS"). */}}
{{- define "sluice.redisUrlEnv" -}}
- name: {{ .name }}
{{- if .ctx.Values.redis.enabled }}
  valueFrom:
    secretKeyRef:
      name: {{ include "sluice.redisName" .ctx }}
      key: url
{{- else if .ctx.Values.externalRedis.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ .ctx.Values.externalRedis.existingSecret }}
      key: {{ .ctx.Values.externalRedis.existingSecretKey }}
{{- else }}
  value: {{ required "externalRedis.url is required with redis.enabled=false (or externalRedis.existingSecret)" .ctx.Values.externalRedis.url | quote }}
{{- end }}
{{- end -}}

{{/* The Secret (in each application namespace) the injected sidecars read their Redis URL
from: sidecar.redisSecret.name, else with the in-chart Redis "<fullname>-redis-url" (unless
sidecar.redisUrl is given); empty: none (the URL goes into the pod specs). */}}
{{- define "sluice.sidecarRedisSecretName" -}}
{{- if .Values.sidecar.redisSecret.name -}}
{{- .Values.sidecar.redisSecret.name -}}
{{- else if and .Values.redis.enabled (not .Values.sidecar.redisUrl) -}}
{{- printf "%s-url" (include "sluice.redisName" .) -}}
{{- end -}}
{{- end -}}

{{/* externalRedis.tls.caSecret mounted into the operator and the collector (a URL names the
file with ?ssl_ca_certs=/etc/sluice/redis-tls/ca.crt). */}}
{{- define "sluice.redisTlsMountPath" -}}/etc/sluice/redis-tls{{- end -}}

{{- define "sluice.analyticsName" -}}
{{- printf "%s-analytics" (include "sluice.fullname" . | trunc 53 | trimSuffix "-") -}}
{{- end -}}

{{/* The collector runs on SQLite unless analytics.database.existingSecret names a PostgreSQL
URL's Secret. */}}
{{- define "sluice.analyticsSqlite" -}}
{{- if not .Values.analytics.database.existingSecret -}}true{{- end -}}
{{- end -}}
