{{/* Names: every object is named after the release, so two releases never collide (cluster-scoped ones too). */}}
{{- define "quantfleet.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "quantfleet.operatorName" -}}{{ include "quantfleet.fullname" . }}-operator{{- end -}}
{{- define "quantfleet.routerName" -}}{{ include "quantfleet.fullname" . }}-router{{- end -}}

{{/* The namespace of the router's PrecisionPolicy and its model's tier Services (default: the operator's
     watched namespace if it has one, else the release's). */}}
{{- define "quantfleet.routerPolicyNamespace" -}}
{{- default (default .Release.Namespace .Values.operator.watchNamespace) .Values.router.policy.namespace -}}
{{- end -}}

{{- define "quantfleet.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "quantfleet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/part-of: quantfleet
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component ("operator" or "router"): stable across upgrades. */}}
{{- define "quantfleet.selectorLabels" -}}
app.kubernetes.io/name: quantfleet-{{ .component }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{/* Pod-level security: non-root with a fixed UID, RuntimeDefault seccomp. */}}
{{- define "quantfleet.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.runAsUser }}
runAsGroup: {{ .Values.runAsUser }}
fsGroup: {{ .Values.runAsUser }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container-level security: read-only root filesystem, no privilege escalation, no capabilities. */}}
{{- define "quantfleet.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.runAsUser }}
runAsGroup: {{ .Values.runAsUser }}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* NetworkPolicy egress rule for DNS (kube-system), to resolve Service names. */}}
{{- define "quantfleet.dnsEgress" -}}
- to:
    - namespaceSelector:
        matchLabels: {kubernetes.io/metadata.name: kube-system}
  ports:
    - {port: 53, protocol: UDP}
    - {port: 53, protocol: TCP}
{{- end -}}
