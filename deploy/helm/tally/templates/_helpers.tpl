{{/* The objects' name: fullnameOverride, else the release's name. */}}
{{- define "tally.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The whole shutdown budget (deploy/kubernetes/base/deployment.yaml explains it). */}}
{{- define "tally.terminationGracePeriod" -}}
{{- add .Values.nginx.preStopSleepSeconds .Values.nginx.drainSeconds .Values.report.shutdownGraceSeconds 5 -}}
{{- end -}}

{{/* The restricted container security context, shared by every container. */}}
{{- define "tally.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* The tally container, as a native sidecar or a plain container. */}}
{{- define "tally.container" -}}
- name: tally
  image: {{ printf "%s:%s" .Values.image.repository .Values.image.tag | quote }}
  {{- with .Values.image.pullPolicy }}
  imagePullPolicy: {{ . }}
  {{- end }}
  {{- if .Values.nativeSidecar }}
  restartPolicy: Always
  {{- end }}
  args: ["run", "--config", "/etc/tally/tally.toml"]
  ports:
    - name: metrics
      containerPort: {{ .Values.tally.telemetryPort }}
  {{- if not .Values.nativeSidecar }}
  # The image has no shell: its own static sleep waits while NGINX drains.
  lifecycle:
    preStop:
      exec:
        command: ["/usr/local/bin/sleep", {{ add .Values.nginx.preStopSleepSeconds .Values.nginx.drainSeconds | toString | quote }}]
  {{- end }}
  # Liveness only: a readiness probe on tally would take the API out of service for a reporting
  # problem. Alert on /healthz (or tally_healthy) instead.
  livenessProbe:
    httpGet:
      path: /livez
      port: metrics
    periodSeconds: 20
    timeoutSeconds: 5
  resources:
    {{- toYaml .Values.tally.resources | nindent 4 }}
  securityContext:
    {{- include "tally.containerSecurityContext" . | nindent 4 }}
  volumeMounts:
    # Read-write: reclaim punches holes in the log.
    - name: logs
      mountPath: /var/log/api
    - name: state
      mountPath: /var/lib/tally
    - name: tally-config
      mountPath: /etc/tally
      readOnly: true
    - name: token
      mountPath: /var/run/secrets/tally
      readOnly: true
{{- end -}}
