{{/* Name of the chart, or nameOverride. */}}
{{- define "botrelay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every object name: the release name, with the chart name added
when the release name does not already hold it. */}}
{{- define "botrelay.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "botrelay.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 54 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of the operator's Deployment, Service, (Cluster)Role and bindings. */}}
{{- define "botrelay.operatorName" -}}
{{- printf "%s-operator" (include "botrelay.fullname" .) -}}
{{- end -}}

{{- define "botrelay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "botrelay.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "botrelay.leaseName" -}}
{{- default (include "botrelay.operatorName" .) .Values.operator.leaderElection.leaseName -}}
{{- end -}}

{{- define "botrelay.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) -}}
{{- end -}}

{{- define "botrelay.relayImage" -}}
{{- printf "%s:%s" .Values.relay.image.repository (default .Chart.AppVersion .Values.relay.image.tag) -}}
{{- end -}}

{{/* Labels of every object of the chart. */}}
{{- define "botrelay.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: botrelay
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Labels that select the operator's pods; they never change after install,
since a Deployment's selector is immutable. */}}
{{- define "botrelay.operatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "botrelay.name" . }}-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "botrelay.operatorLabels" -}}
{{ include "botrelay.labels" . }}
app.kubernetes.io/name: {{ include "botrelay.name" . }}-operator
app.kubernetes.io/component: operator
{{- end -}}

{{- define "botrelay.monitoringLabels" -}}
{{ include "botrelay.labels" . }}
{{- with .Values.monitoring.labels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The rules the operator needs in every namespace whose MessagingEndpoints it
manages. Keep this list equal to what the operator really calls: the chart test
compares it with target/rbac-observed.json, written by the operator's
integration test (operator/tests/rbac.rs). The operator creates and changes its
objects with server-side apply: Kubernetes authorizes an apply that makes an
object as create, one that changes it as patch, so both are granted. No update,
no delete (owner references do that). */}}
{{- define "botrelay.operatorRules" -}}
- apiGroups: [botrelay.dev]
  resources: [messagingendpoints]
  verbs: [get, list, watch]
- apiGroups: [botrelay.dev]
  resources: [messagingendpoints/status]
  verbs: [patch]
# Secrets: read by name only (the one Secret an endpoint uses), never listed
# or watched. A server-side apply that makes an object is authorized as
# create, one that changes it as patch: both are needed.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create, patch]
- apiGroups: [""]
  resources: [services, persistentvolumeclaims]
  verbs: [list, watch, create, patch]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [list, watch, create, patch]
# A disruption budget for endpoints with several relay pods (the nats store).
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [list, watch, create, patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}

{{/* Leader election: only the Lease, only in the release namespace. The lease
manager reads it, creates it once and patches it to acquire and renew. */}}
{{- define "botrelay.leaseRules" -}}
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [get, create, patch]
{{- end -}}
