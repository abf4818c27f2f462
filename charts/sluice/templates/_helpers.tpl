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
