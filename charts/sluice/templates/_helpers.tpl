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

{{/* A StatefulSet's volumeClaimTemplates cannot change: an upgrade that turns
redis.persistence on or off, or changes its size or StorageClass, would be refused by the API
server halfway through the upgrade ("updates to statefulset spec for fields other than ... are
forbidden"). Compared with the live StatefulSet (lookup: helm install/upgrade; `helm template`
sees none, so GitOps tools get the API server's refusal instead), it fails first, naming the
step that makes the change possible. */}}
{{- define "sluice.redisPersistenceGuard" -}}
{{- $name := include "sluice.redisName" . }}
{{- $p := .Values.redis.persistence }}
{{- $orphan := printf "kubectl -n %s delete statefulset %s --cascade=orphan" .Release.Namespace $name }}
{{- with lookup "apps/v1" "StatefulSet" .Release.Namespace $name }}
{{- $live := .spec.volumeClaimTemplates | default list }}
{{- if ne (gt (len $live) 0) $p.enabled }}
{{- fail (printf "redis.persistence.enabled changes to %v, which StatefulSet %s cannot take in place (its volumeClaimTemplates are immutable). Run `%s` (Redis keeps running), then this upgrade again: Redis restarts %s; the operator writes config and grants back within a resync, buckets start full. See the chart README, Redis." $p.enabled $name $orphan (ternary "on its new PVC, empty" (printf "without its PVC (data-%s-0 stays until you delete it)" $name) $p.enabled)) }}
{{- end }}
{{- if $p.enabled }}
{{- $claim := (index $live 0).spec }}
{{- if ne (default "" $claim.storageClassName) (default "" $p.storageClass) }}
{{- fail (printf "redis.persistence.storageClass changes from %q to %q, which StatefulSet %s cannot take in place. Run `%s`, delete PVC data-%s-0 (its data goes), then this upgrade again. See the chart README, Redis." (default "" $claim.storageClassName) (default "" $p.storageClass) $name $orphan $name) }}
{{- end }}
{{- $was := include "sluice.quantityBytes" $claim.resources.requests.storage }}
{{- $now := include "sluice.quantityBytes" $p.size }}
{{- if and $was $now (ne $was $now) }}
{{- fail (printf "redis.persistence.size changes from %s to %s, which StatefulSet %s cannot take in place. Grow PVC data-%s-0 itself where its StorageClass allows expansion (`kubectl -n %s patch pvc data-%s-0 -p '{\"spec\":{\"resources\":{\"requests\":{\"storage\":\"%s\"}}}}'`), run `%s`, then this upgrade again. See the chart README, Redis." $claim.resources.requests.storage $p.size $name $name $.Release.Namespace $name $p.size $orphan) }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* A storage quantity in bytes when it is an integer with a binary suffix (or none), else
empty: the API server writes quantities back in its own form (1024Mi as 1Gi), so only these
are compared; other forms are let through. */}}
{{- define "sluice.quantityBytes" -}}
{{- $q := toString . }}
{{- if regexMatch "^[0-9]+(Ki|Mi|Gi|Ti|Pi)?$" $q }}
{{- $n := regexFind "^[0-9]+" $q }}
{{- $unit := trimPrefix $n $q }}
{{- $f := get (dict "" 1 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "Pi" 1125899906842624) $unit }}
{{- mul (atoi $n) $f }}
{{- end }}
{{- end -}}

{{/* The in-chart Redis's URL without its password: a Service name that resolves from every
namespace (the injected sidecars run in the applications' ones). */}}
{{- define "sluice.redisAddress" -}}
{{- printf "%s.%s.svc:6379" (include "sluice.redisName" .) .Release.Namespace -}}
{{- end -}}

{{/* The in-chart Redis's password: the live Secret's (lookup, so upgrades keep it), else a
new one, drawn once per render (memoised in .Values, which every template of the render shares)
so the Secret and the checksums of the pods that read it agree. Not used with
redis.auth.existingSecret. */}}
{{- define "sluice.redisGeneratedPassword" -}}
{{- $memo := .Values.redis }}
{{- if not (hasKey $memo "__password") }}
{{- $password := randAlphaNum 40 }}
{{- with lookup "v1" "Secret" .Release.Namespace (include "sluice.redisName" .) }}
{{- if and .data .data.password }}
{{- $password = .data.password | b64dec }}
{{- end }}
{{- end }}
{{- $_ := set $memo "__password" $password }}
{{- end }}
{{- get $memo "__password" }}
{{- end -}}

{{/* The Secret and key holding the in-chart Redis's password. */}}
{{- define "sluice.redisPasswordSecret" -}}
{{- .Values.redis.auth.existingSecret | default (include "sluice.redisName" .) -}}
{{- end -}}
{{- define "sluice.redisPasswordKey" -}}
{{- if .Values.redis.auth.existingSecret }}{{ .Values.redis.auth.existingSecretKey }}{{ else }}password{{ end -}}
{{- end -}}

{{/* Pod annotation that changes when the in-chart Redis's password does, on Redis and on every
pod that read it at start (the operator, the collector), so none keeps an old one. Generated:
a hash of the password (40 random characters, no guessing from the hash). From
redis.auth.existingSecret: that Secret's resourceVersion (a hash of a chosen password would
let whoever reads pods guess it offline); `helm template` cannot look it up, hence "unknown"
there: restart by hand after a rotation (chart README, Redis). */}}
{{- define "sluice.redisAuthChecksum" -}}
{{- if .Values.redis.enabled -}}
checksum/redis-auth: {{ if .Values.redis.auth.existingSecret -}}
{{ (lookup "v1" "Secret" .Release.Namespace .Values.redis.auth.existingSecret).metadata | default dict | dig "resourceVersion" "unknown" | quote }}
{{- else -}}
{{ include "sluice.redisGeneratedPassword" . | sha256sum | quote }}
{{- end }}
{{- end -}}
{{- end -}}

{{/* The env entry NAME = the Redis URL for a pod of the release namespace (the operator, the
collector): from the in-chart Redis's Secret, from externalRedis.existingSecret, or
externalRedis.url as a value. With redis.auth.existingSecret (a password only) the URL is
built by the kubelet from the password's env entry ($(REDIS_PASSWORD) expansion), so it never
lands in the pod spec. Called with (dict "ctx" $ "name" "SLUICE_OPERATOR_REDIS"). */}}
{{- define "sluice.redisUrlEnv" -}}
{{- if and .ctx.Values.redis.enabled .ctx.Values.redis.auth.existingSecret }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .ctx.Values.redis.auth.existingSecret }}
      key: {{ .ctx.Values.redis.auth.existingSecretKey }}
{{- end }}
- name: {{ .name }}
{{- if and .ctx.Values.redis.enabled .ctx.Values.redis.auth.existingSecret }}
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s" (include "sluice.redisAddress" .ctx) | quote }}
{{- else if .ctx.Values.redis.enabled }}
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
