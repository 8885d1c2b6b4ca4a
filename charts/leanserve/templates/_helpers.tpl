{{/* The chart's name: `leanserve`, or nameOverride. */}}
{{- define "leanserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The prefix of every object's name: fullnameOverride, else the release's name (when it already
contains the chart's name) or RELEASE-NAME. */}}
{{- define "leanserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "leanserve.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The operator's Deployment, Service and ClusterRole: FULLNAME-operator, within a DNS label. */}}
{{- define "leanserve.operatorName" -}}
{{- printf "%s-operator" (include "leanserve.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The price table's ConfigMap. */}}
{{- define "leanserve.pricesName" -}}
{{- printf "%s-prices" (include "leanserve.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "leanserve.serviceAccountName" -}}
{{- default (include "leanserve.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "leanserve.labels" -}}
app.kubernetes.io/name: {{ include "leanserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "leanserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "leanserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* Image references, in one place. The tags default to the chart's appVersion: the images
`make images` builds and the operator's own defaults (leanserve.controller.builders.BuildSettings). */}}
{{- define "leanserve.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (.Values.operator.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "leanserve.servingImage" -}}
{{- .Values.serving.image | default (printf "ghcr.io/leanserve/serving:%s" .Chart.AppVersion) -}}
{{- end -}}

{{- define "leanserve.gpuImage" -}}
{{- .Values.serving.gpuImage | default (printf "ghcr.io/leanserve/serving-gpu:%s" .Chart.AppVersion) -}}
{{- end -}}

{{- define "leanserve.redisImage" -}}
{{- .Values.serving.redisImage -}}
{{- end -}}

{{/* Where the price table's ConfigMap is mounted in the operator pod, and the file LEANSERVE_PRICES names. */}}
{{- define "leanserve.pricesDir" -}}/etc/leanserve/prices{{- end -}}
{{- define "leanserve.pricesFile" -}}{{ include "leanserve.pricesDir" . }}/prices.yaml{{- end -}}

{{/* Monitoring of the serving pods (monitoring.yaml, scrape-config.yaml, dashboards.yaml). */}}
{{- define "leanserve.monitorName" -}}
{{- printf "%s-serving" (include "leanserve.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "leanserve.scrapeConfigName" -}}
{{- printf "%s-scrape-config" (include "leanserve.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "leanserve.dashboardsName" -}}
{{- printf "%s-dashboards" (include "leanserve.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The labels the operator puts on every serving pod and Service it creates
(leanserve.controller.builders.labels: MANAGED_BY and component "serving"); the managed Redis
(component "cache") and the profiling Jobs are left out. */}}
{{- define "leanserve.servingSelectorLabels" -}}
app.kubernetes.io/managed-by: leanserve
app.kubernetes.io/component: serving
{{- end -}}

{{/* The labels every scraped series gets, in the Prometheus Operator's spelling (RelabelConfig); the
plain scrape config (scrape-config.yaml) writes the same rules in Prometheus's. The operator's observer
selects a deployment's series by namespace and inferencedeployment (leanserve.observer.queries). */}}
{{- define "leanserve.monitorRelabelings" -}}
- sourceLabels: [__meta_kubernetes_namespace]
  targetLabel: namespace
- sourceLabels: [__meta_kubernetes_pod_name]
  targetLabel: pod
- sourceLabels: [__meta_kubernetes_pod_label_leanserve_dev_inferencedeployment]
  targetLabel: inferencedeployment
{{- end -}}
