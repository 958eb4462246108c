{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "finflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name of the workers. */}}
{{- define "finflow.fullname" -}}
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

{{/* The headless Service giving each worker pod a stable DNS name. */}}
{{- define "finflow.headlessName" -}}
{{- printf "%s-headless" (include "finflow.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "finflow.apiName" -}}
{{- printf "%s-api" (include "finflow.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "finflow.secretName" -}}
{{- default (include "finflow.fullname" .) .Values.existingSecret }}
{{- end }}

{{- define "finflow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finflow.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "finflow.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "finflow.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "finflow.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "finflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The autoscalers' ceiling: never more workers than input partitions. */}}
{{- define "finflow.maxReplicas" -}}
{{- $partitions := int .Values.kafka.partitions }}
{{- $max := int .Values.autoscaling.maxReplicas }}
{{- if or (eq $max 0) (gt $max $partitions) }}{{ $partitions }}{{ else }}{{ $max }}{{ end }}
{{- end }}

{{- define "finflow.saslEnabled" -}}
{{- if hasPrefix "SASL_" .Values.kafka.securityProtocol }}true{{ end }}
{{- end }}

{{- define "finflow.tlsEnabled" -}}
{{- if has .Values.kafka.securityProtocol (list "SSL" "SASL_SSL") }}true{{ end }}
{{- end }}

{{/* Environment shared by every FinFlow container (worker, api, migrate). */}}
{{- define "finflow.env" -}}
- name: FINFLOW_APP_ID
  value: {{ .Values.appId | quote }}
- name: FINFLOW_BROKER_URL
  value: {{ .Values.kafka.bootstrapServers | quote }}
- name: FINFLOW_BROKER_FLAVOR
  value: {{ .Values.kafka.flavor | quote }}
- name: FINFLOW_TOPIC_PARTITIONS
  value: {{ .Values.kafka.partitions | quote }}
- name: FINFLOW_TOPIC_REPLICATION
  value: {{ .Values.kafka.replication | quote }}
- name: FINFLOW_WEB_PORT
  value: {{ .Values.service.port | quote }}
- name: FINFLOW_DATA_DIR
  value: /var/lib/finflow
- name: FINFLOW_BROKER_SECURITY_PROTOCOL
  value: {{ .Values.kafka.securityProtocol | quote }}
{{- if include "finflow.saslEnabled" . }}
- name: FINFLOW_BROKER_SASL_MECHANISM
  value: {{ .Values.kafka.sasl.mechanism | quote }}
- name: FINFLOW_BROKER_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ include "finflow.secretName" . }}
      key: {{ .Values.secretKeys.kafkaSaslUsername }}
- name: FINFLOW_BROKER_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "finflow.secretName" . }}
      key: {{ .Values.secretKeys.kafkaSaslPassword }}
{{- end }}
{{- if and (include "finflow.tlsEnabled" .) .Values.kafka.tls.caSecret }}
- name: FINFLOW_BROKER_SSL_CAFILE
  value: /etc/finflow/kafka-ca/{{ .Values.kafka.tls.caKey }}
{{- end }}
{{- if and (include "finflow.tlsEnabled" .) .Values.kafka.tls.clientCertSecret }}
- name: FINFLOW_BROKER_SSL_CERTFILE
  value: /etc/finflow/kafka-client/tls.crt
- name: FINFLOW_BROKER_SSL_KEYFILE
  value: /etc/finflow/kafka-client/tls.key
{{- end }}
- name: FINFLOW_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "finflow.secretName" . }}
      key: {{ .Values.secretKeys.databaseUrl }}
- name: FINFLOW_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "finflow.secretName" . }}
      key: {{ .Values.secretKeys.redisUrl }}
      optional: true
- name: FINFLOW_API_TOKENS
  valueFrom:
    secretKeyRef:
      name: {{ include "finflow.secretName" . }}
      key: {{ .Values.secretKeys.apiTokens }}
      optional: true
{{- range $name, $value := .Values.config }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}

{{/* Volumes every FinFlow pod mounts: /tmp (read-only root) and the Kafka CA, if any. */}}
{{- define "finflow.commonVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 256Mi
{{- if and (include "finflow.tlsEnabled" .) .Values.kafka.tls.caSecret }}
- name: kafka-ca
  secret:
    secretName: {{ .Values.kafka.tls.caSecret }}
    items:
      - key: {{ .Values.kafka.tls.caKey }}
        path: {{ .Values.kafka.tls.caKey }}
{{- end }}
{{- if and (include "finflow.tlsEnabled" .) .Values.kafka.tls.clientCertSecret }}
- name: kafka-client
  secret:
    secretName: {{ .Values.kafka.tls.clientCertSecret }}
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- end }}
{{- end }}

{{- define "finflow.commonMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if and (include "finflow.tlsEnabled" .) .Values.kafka.tls.caSecret }}
- name: kafka-ca
  mountPath: /etc/finflow/kafka-ca
  readOnly: true
{{- end }}
{{- if and (include "finflow.tlsEnabled" .) .Values.kafka.tls.clientCertSecret }}
- name: kafka-client
  mountPath: /etc/finflow/kafka-client
  readOnly: true
{{- end }}
{{- end }}

{{/* Fail early on combinations the app would reject at start. */}}
{{- define "finflow.validate" -}}
{{- if and (include "finflow.saslEnabled" .) (not .Values.kafka.sasl.mechanism) }}
{{- fail "kafka.sasl.mechanism is required with a SASL_* kafka.securityProtocol" }}
{{- end }}
{{- if and .Values.kafka.sasl.mechanism (not (include "finflow.saslEnabled" .)) }}
{{- fail "kafka.sasl.mechanism needs kafka.securityProtocol SASL_PLAINTEXT or SASL_SSL" }}
{{- end }}
{{- if and (or .Values.kafka.tls.caSecret .Values.kafka.tls.clientCertSecret) (not (include "finflow.tlsEnabled" .)) }}
{{- fail "kafka.tls secrets need kafka.securityProtocol SSL or SASL_SSL" }}
{{- end }}
{{- if gt (int .Values.autoscaling.minReplicas) (int (include "finflow.maxReplicas" .)) }}
{{- fail "autoscaling.minReplicas exceeds the partition count (kafka.partitions)" }}
{{- end }}
{{- end }}
