{{- define "api-router.labels" -}}
app: api-router-service
app.kubernetes.io/name: api-router-service
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}
{{- define "api-router.selector" -}}
app: api-router-service
{{- end -}}
