{{/* Names ------------------------------------------------------------------------- */}}

{{- define "kms-cluster.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Kept to 52 characters: StatefulSet pods add "-N" and the controller adds a
     revision hash label of 11 characters to the 63-character limit. */}}
{{- define "kms-cluster.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kms-cluster.headless" -}}
{{- printf "%s-peers" (include "kms-cluster.fullname" .) -}}
{{- end -}}

{{- define "kms-cluster.adminService" -}}
{{- printf "%s-admin" (include "kms-cluster.fullname" .) -}}
{{- end -}}

{{- define "kms-cluster.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kms-cluster.labels" -}}
helm.sh/chart: {{ include "kms-cluster.chart" . }}
{{ include "kms-cluster.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kms-cluster
{{- end -}}

{{- define "kms-cluster.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kms-cluster.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kms-cluster.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kms-cluster.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kms-cluster.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "kms-cluster.adminSecretName" -}}
{{- default (printf "%s-admin" (include "kms-cluster.fullname" .)) .Values.admin.existingSecret -}}
{{- end -}}

{{- define "kms-cluster.tsigSecretName" -}}
{{- default (printf "%s-tsig" (include "kms-cluster.fullname" .)) .Values.dns.tsig.existingSecret -}}
{{- end -}}

{{- define "kms-cluster.tlsSecretName" -}}
{{- default (printf "%s-raft-tls" (include "kms-cluster.fullname" .)) .Values.raftTls.existingSecret -}}
{{- end -}}

{{/* Stable DNS name of pod $i in the headless Service. Args: (list $ $i). */}}
{{- define "kms-cluster.podFqdn" -}}
{{- $top := index . 0 -}}
{{- $i := index . 1 -}}
{{- printf "%s-%d.%s.%s.svc.%s" (include "kms-cluster.fullname" $top) (int $i) (include "kms-cluster.headless" $top) $top.Release.Namespace $top.Values.cluster.clusterDomain -}}
{{- end -}}

{{/* Port the probes and Prometheus use: the metrics listener when separate. */}}
{{- define "kms-cluster.healthPortName" -}}
{{- if .Values.metrics.separateListener -}}metrics{{- else -}}admin{{- end -}}
{{- end -}}

{{/* Checks that stop a bad configuration at render time, with a message that says what
     to do. Included by the StatefulSet, so every install and upgrade runs them. */}}
{{- define "kms-cluster.validate" -}}
{{- $n := int .Values.replicaCount -}}
{{- if lt $n 1 -}}
{{- fail (printf "kms-cluster: replicaCount must be an odd number (1, 3, 5, 7, 9), got %d" $n) -}}
{{- end -}}
{{- if eq (mod $n 2) 0 -}}
{{- fail (printf "kms-cluster: replicaCount must be an odd number (1, 3, 5, 7, 9), got %d. A Raft cluster of N nodes needs a majority of N to work: 4 nodes survive the loss of 1 node, exactly like 3, and 6 like 5, so an even size only adds a node that can fail. Use %d or %d." $n (sub $n 1) (add $n 1)) -}}
{{- end -}}
{{- if and .Values.service.externalTrafficPolicy (not (has .Values.service.type (list "LoadBalancer" "NodePort"))) -}}
{{- fail (printf "kms-cluster: service.externalTrafficPolicy=%s needs service.type LoadBalancer or NodePort (it is %s)" .Values.service.externalTrafficPolicy .Values.service.type) -}}
{{- end -}}
{{- if and .Values.raftTls.enabled (not .Values.raftTls.existingSecret) (not (and .Values.raftTls.cert .Values.raftTls.key .Values.raftTls.ca)) -}}
{{- fail "kms-cluster: raftTls.enabled needs raftTls.existingSecret (keys tls.crt, tls.key, ca.crt) or all of raftTls.cert, raftTls.key and raftTls.ca" -}}
{{- end -}}
{{- if and .Values.dns.publish (not .Values.dns.tsig.existingSecret) (not .Values.dns.tsig.secret) -}}
{{- fail "kms-cluster: dns.publish needs the TSIG secret: dns.tsig.existingSecret or dns.tsig.secret" -}}
{{- end -}}
{{- if and (gt (int .Values.preStopSleepSeconds) 0) (semverCompare "<1.30.0-0" .Capabilities.KubeVersion.Version) -}}
{{- fail (printf "kms-cluster: preStopSleepSeconds needs Kubernetes 1.30 or later (the sleep lifecycle action); this cluster is %s: set it to 0" .Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- $cur := int .Values.scaleDown.currentReplicas -}}
{{- if and (gt $cur 0) (lt $cur $n) -}}
{{- fail (printf "kms-cluster: scaleDown.currentReplicas (%d) is below replicaCount (%d); it names the size you are scaling down FROM" $cur $n) -}}
{{- end -}}
{{- end -}}

{{/* Configuration file of pod $i (TOML). Args: (list $ $i). */}}
{{- define "kms-cluster.nodeConfig" -}}
{{- $top := index . 0 -}}
{{- $i := int (index . 1) -}}
{{- $v := $top.Values -}}
{{- $fqdn := include "kms-cluster.podFqdn" (list $top $i) -}}
{{- $pod := printf "%s-%d" (include "kms-cluster.fullname" $top) $i -}}
# kmsd configuration of pod {{ $pod }} (rendered by the kms-cluster chart).
# The admin token comes from KMSD_ADMIN_TOKEN (Secret {{ include "kms-cluster.adminSecretName" $top }}).

[node]
id = {{ add $i 1 }}
data_dir = "/var/lib/kmsd"
advertise_host = {{ ternary (replace "{pod}" $pod $v.dns.advertiseHostTemplate) $fqdn (ne $v.dns.advertiseHostTemplate "") | quote }}
advertise_port = {{ int $v.dns.advertisePort }}

[kms]
listen = ["0.0.0.0:{{ $v.ports.kms }}"]
max_connections = {{ int $v.config.kms.maxConnections }}
{{- with $v.config.kms.allowNetworks }}
allow_networks = {{ toJson . }}
{{- end }}

[admin]
listen = "0.0.0.0:{{ $v.ports.admin }}"
advertise = "{{ $fqdn }}:{{ $v.ports.admin }}"
{{- if $v.metrics.separateListener }}
metrics_listen = "0.0.0.0:{{ $v.ports.metrics }}"
{{- end }}

[raft]
listen = "0.0.0.0:{{ $v.ports.raft }}"
advertise = "{{ $fqdn }}:{{ $v.ports.raft }}"
{{- if and (eq $i 0) $v.cluster.bootstrap }}
# No join list: with an empty volume this pod bootstraps a new cluster (cluster.bootstrap).
{{- else }}
# Used only with an empty volume: join through these members' Raft ports (retried){{ if not $v.raftTls.enabled }},
# with the shared cluster secret (KMSD_CLUSTER_SECRET_FILE){{ end }}.
join = [
{{- $first := true -}}
{{- range $j := until (int $v.replicaCount) -}}
{{- if ne $j $i -}}
{{- if not $first }}, {{ end -}}
{{- if $v.raftTls.enabled -}}
"http://{{ include "kms-cluster.podFqdn" (list $top $j) }}:{{ $v.ports.admin }}"
{{- else -}}
"{{ include "kms-cluster.podFqdn" (list $top $j) }}:{{ $v.ports.raft }}"
{{- end -}}
{{- $first = false -}}
{{- end -}}
{{- end -}}
]
{{- end }}
{{- if $v.raftTls.enabled }}

[raft.tls]
cert = "/etc/kmsd/tls/tls.crt"
key = "/etc/kmsd/tls/tls.key"
ca = "/etc/kmsd/tls/ca.crt"
server_name = {{ $v.raftTls.serverName | quote }}
{{- end }}
{{- range $v.dns.publish }}

[[dns.publish]]
zone = {{ .zone | quote }}
server = {{ .server | quote }}
tsig_key_name = {{ .tsigKeyName | quote }}
tsig_algorithm = {{ default "hmac-sha256" .tsigAlgorithm | quote }}
tsig_secret_file = "/etc/kmsd/dns/tsig-secret"
ttl = {{ default 60 .ttl | int }}
priority = {{ default 0 .priority | int }}
weight = {{ default 100 .weight | int }}
{{- end }}
{{- with $v.config.policy }}

[policy]
{{- range $k, $val := . }}
{{ $k }} = {{ toJson $val }}
{{- end }}
{{- end }}

[log]
format = {{ $v.config.log.format | quote }}
level = {{ $v.config.log.level | quote }}
{{ end -}}

{{/* Everything in a node's configuration that every pod shares; its checksum restarts
     the pods when it changes. The per-pod join lists are left out on purpose: adding a
     replica changes them, and must not restart the existing pods (they have data and
     never read the list again). */}}
{{/* Name of the Secret holding the shared cluster secret (built-in cluster PKI). */}}
{{- define "kms-cluster.clusterSecretName" -}}
{{- default (printf "%s-cluster-secret" (include "kms-cluster.fullname" .)) .Values.clusterPki.existingSecret -}}
{{- end -}}

{{- define "kms-cluster.configChecksum" -}}
{{- $v := .Values -}}
{{- list $v.ports $v.config $v.metrics.separateListener $v.raftTls.enabled $v.raftTls.serverName $v.dns.publish $v.dns.advertiseHostTemplate $v.dns.advertisePort | toJson | sha256sum -}}
{{- end -}}
