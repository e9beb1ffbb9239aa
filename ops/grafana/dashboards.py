#!/usr/bin/env python3
"""Writes the Grafana dashboards in dashboards/ (the JSON files are what Grafana imports;
this script is their source: edit it, run it, commit both).

Every panel query names only metrics of the README's metrics table or recording rules of
ops/prometheus/rules.yml; the observability test asks a real Prometheus for each of them.
"""
import json
import pathlib

DS = {"type": "prometheus", "uid": "${datasource}"}
OUT = pathlib.Path(__file__).resolve().parent / "dashboards"


def variables(job_metric, name, label):
    return [
        {"name": "datasource", "label": "Data source", "type": "datasource",
         "query": "prometheus", "current": {}, "hide": 0, "refresh": 1, "options": []},
        {"name": name, "label": label, "type": "query", "datasource": DS,
         "definition": f"label_values({job_metric}, instance)",
         "query": {"query": f"label_values({job_metric}, instance)", "refId": name},
         "includeAll": True, "multi": True, "allValue": ".*", "current": {},
         "refresh": 2, "sort": 1, "hide": 0, "options": []},
    ]


class Board:
    def __init__(self, uid, title, description, job_metric, var="instance", label="Node"):
        self.uid, self.title, self.description = uid, title, description
        self.panels, self.x, self.y, self.row_h = [], 0, 0, 0
        self.templating = variables(job_metric, var, label)
        self.annotations = [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts", "type": "dashboard"}]

    def annotation(self, name, expr, title, color):
        self.annotations.append({
            "name": name, "datasource": DS, "enable": True, "hide": False,
            "iconColor": color, "expr": expr, "step": "60s",
            "titleFormat": title, "textFormat": "", "tagKeys": "kind,event",
            "useValueForTime": False})

    def row(self, title):
        self.newline()
        self.panels.append({"id": len(self.panels) + 1, "type": "row", "title": title,
                            "collapsed": False, "panels": [],
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}})
        self.y += 1

    def newline(self):
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0

    def panel(self, kind, title, description, targets, unit="short", w=12, h=8,
              options=None, field=None, mappings=None):
        if self.x + w > 24:
            self.newline()
        defaults = {"unit": unit, **(field or {})}
        if mappings:
            defaults["mappings"] = mappings
        self.panels.append({
            "id": len(self.panels) + 1, "type": kind, "title": title,
            "description": description, "datasource": DS,
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "targets": [{"refId": chr(ord("A") + i), "datasource": DS, "expr": e,
                         "legendFormat": l, "range": True, "instant": False}
                        for i, (e, l) in enumerate(targets)],
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": options or {},
        })
        self.x += w
        self.row_h = max(self.row_h, h)

    def ts(self, title, description, targets, unit="short", **kw):
        self.panel("timeseries", title, description, targets, unit,
                   options={"legend": {"displayMode": "table", "placement": "bottom",
                                       "calcs": ["lastNotNull", "max"]},
                            "tooltip": {"mode": "multi", "sort": "desc"}}, **kw)

    def stat(self, title, description, targets, unit="short", w=6, h=4, **kw):
        self.panel("stat", title, description, targets, unit, w=w, h=h,
                   options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                              "values": False},
                            "colorMode": "value", "graphMode": "area",
                            "textMode": "auto"}, **kw)

    def write(self):
        self.newline()
        doc = {
            "uid": self.uid, "title": self.title, "description": self.description,
            "tags": ["spiffe-ca"], "timezone": "browser", "editable": True,
            "graphTooltip": 1, "schemaVersion": 39, "version": 1, "refresh": "30s",
            "time": {"from": "now-6h", "to": "now"}, "fiscalYearStartMonth": 0,
            "liveNow": False, "weekStart": "", "links": [
                {"title": "CA dashboards", "type": "dashboards", "tags": ["spiffe-ca"],
                 "asDropdown": True, "includeVars": True, "keepTime": True}],
            "templating": {"list": self.templating},
            "annotations": {"list": self.annotations},
            "panels": self.panels,
        }
        OUT.mkdir(exist_ok=True)
        (OUT / f"{self.uid}.json").write_text(json.dumps(doc, indent=2) + "\n")


N = 'instance=~"$instance"'
RI = "$__rate_interval"
# One annotation per rotation step (a failed step included), from the counters.
ROTATION_EVENTS = "sum by (kind, event) (increase(ca_authority_events_total[2m])) > 0"


def issuance():
    b = Board("ca-issuance", "CA / Issuance",
              "SVIDs minted per node, errors, latency and the key managers behind them.",
              "ca_node_build_info")
    b.row("SVIDs")
    b.ts("X.509-SVIDs issued per second", "Minted X.509-SVIDs (workloads and agents), by node.",
         [(f'sum by (instance) (rate(ca_x509_svids_issued_total{{{N},result="ok"}}[{RI}]))',
           "{{instance}}")], "ops")
    b.ts("JWT-SVIDs issued per second", "Signed JWT-SVIDs, by node.",
         [(f'sum by (instance) (rate(ca_jwt_svids_issued_total{{{N},result="ok"}}[{RI}]))',
           "{{instance}}")], "ops")
    b.ts("Issuance errors per second", "Refused or failed SVID requests, by node and kind.",
         [(f'sum by (instance) (rate(ca_x509_svids_issued_total{{{N},result="error"}}[{RI}]))',
           "x509 {{instance}}"),
          (f'sum by (instance) (rate(ca_jwt_svids_issued_total{{{N},result="error"}}[{RI}]))',
           "jwt {{instance}}")], "ops")
    b.stat("Error ratio (5m, cluster)", "Share of SVID requests that failed; alert above 5%.",
           [("ca:svid_issue_error_ratio:rate5m", "errors")], "percentunit",
           field={"thresholds": {"mode": "absolute", "steps": [
               {"color": "green", "value": None}, {"color": "red", "value": 0.05}]}})
    b.stat("SVIDs per second (cluster)", "X.509 and JWT SVIDs minted by every node.",
           [(f'sum(rate(ca_x509_svids_issued_total{{result="ok"}}[{RI}])) + '
             f'sum(rate(ca_jwt_svids_issued_total{{result="ok"}}[{RI}]))', "SVIDs/s")], "ops")
    b.row("Latency")
    b.ts("X.509-SVID mint latency", "CSR checks plus signing, percentiles over the selected nodes.",
         [(f"histogram_quantile({q}, sum by (le) (rate(ca_x509_svid_issue_seconds_bucket{{{N}}}[{RI}])))",
           f"p{int(q * 100)}") for q in (0.5, 0.9, 0.99)], "s")
    b.ts("Key manager sign latency (p99)", "The key-manager call alone, by backend and role.",
         [(f"histogram_quantile(0.99, sum by (le, backend, role) (rate(ca_keymanager_sign_seconds_bucket{{{N}}}[{RI}])))",
           "{{backend}} {{role}}")], "s")
    b.row("Key managers")
    b.stat("Key managers up", "1: the last operation on the role's key manager worked.",
           [(f"min by (role) (ca_keymanager_up{{{N}}})", "{{role}}")], w=8,
           mappings=[{"type": "value", "options": {
               "0": {"text": "DOWN", "color": "red"}, "1": {"text": "up", "color": "green"}}}])
    b.ts("Key manager errors per second", "By backend and kind of error.",
         [(f"sum by (backend, kind) (rate(ca_keymanager_errors_total{{{N}}}[{RI}]))",
           "{{backend}} {{kind}}")], "ops", w=8)
    b.ts("Key manager operations in flight", "Calls waiting on the HSM or KMS.",
         [(f"sum by (instance) (ca_keymanager_in_flight{{{N}}})", "{{instance}}")], w=8)
    b.row("Node API")
    b.ts("Node API requests per second", "Agent calls by method and gRPC code.",
         [(f"sum by (method, code) (rate(ca_node_api_requests_total{{{N}}}[{RI}]))",
           "{{method}} {{code}}")], "ops")
    b.ts("Agent attestations per second", "By method and result.",
         [(f"sum by (method, result) (rate(ca_agent_attestations_total{{{N}}}[{RI}]))",
           "{{method}} {{result}}")], "ops")
    b.ts("Refused by a limit", "Node API calls and connections refused by rate limits and bounds.",
         [(f"sum by (limit) (rate(ca_node_api_rate_limited_total{{{N}}}[{RI}]))", "{{limit}}")],
         "ops")
    b.ts("Connected agents", "Node-port connections with a client certificate (agents, and members "
         "calling the node API or the Raft transport) and without one (attesting).",
         [(f"sum by (instance, kind) (ca_node_api_connections_open{{{N}}})", "{{instance}} {{kind}}")])
    b.ts("Agent sync latency (p99)", "SyncEntries, by node.",
         [(f"histogram_quantile(0.99, sum by (le, instance) (rate(ca_node_api_sync_seconds_bucket{{{N}}}[{RI}])))",
           "{{instance}}")], "s")
    b.write()


STATE_MAP = [{"type": "value", "options": {
    "0": {"text": "prepared", "color": "blue"}, "1": {"text": "active", "color": "green"},
    "2": {"text": "retired", "color": "text"}, "3": {"text": "revoked", "color": "red"}}}]


def rotation():
    b = Board("ca-rotation", "CA / Rotation & authorities",
              "Every root, intermediate and JWT key: state, expiry, the next rotation step; "
              "rotations and revocations as annotations.", "ca_node_build_info")
    b.annotation("Rotation events", ROTATION_EVENTS, "{{kind}} {{event}}", "orange")
    b.panel("state-timeline", "Authorities", "Each authority's state over time.",
            [(f"max by (kind, id) (ca_authority_state{{{N}}})", "{{kind}} {{id}}")], w=24, h=10,
            options={"mergeValues": True, "showValue": "auto", "alignValue": "left",
                     "rowHeight": 0.8, "legend": {"showLegend": True}},
            field={"color": {"mode": "thresholds"}}, mappings=STATE_MAP)
    b.panel("table", "Active authorities: time to expiry", "Seconds until each active authority expires.",
            [("max by (kind, id, node) (ca_authority_expiry_timestamp_seconds{state=\"active\"}) - time()",
              "{{kind}} {{id}}")], "s", w=12,
            options={"showHeader": True})
    b.panel("bargauge", "Active authorities: life left", "Share of the lifetime still ahead; "
            "a successor is prepared at 1/2 and activated at 5/6 of it.",
            [("ca:authority_remaining_fraction", "{{kind}} {{node}} {{id}}")], "percentunit", w=12,
            options={"displayMode": "gradient", "orientation": "horizontal",
                     "reduceOptions": {"calcs": ["lastNotNull"], "values": False}},
            field={"min": 0, "max": 1, "thresholds": {"mode": "absolute", "steps": [
                {"color": "red", "value": None}, {"color": "orange", "value": 0.17},
                {"color": "green", "value": 0.5}]}})
    b.ts("Next scheduled step in", "Time until each node's next prepare or activate step, by kind.",
         [("max by (kind, node, step) (ca_authority_next_step_timestamp_seconds) - time()",
           "{{kind}} {{node}} {{step}}")], "s")
    b.stat("Successor prepared", "1: the next authority is published and waits for activation.",
           [("max by (kind, node) (ca_authority_successor_prepared)", "{{kind}} {{node}}")],
           w=12, h=8, mappings=[{"type": "value", "options": {
               "0": {"text": "no", "color": "text"}, "1": {"text": "yes", "color": "blue"}}}])
    b.ts("Rotation events", "Prepared, activated, retired, revoked and failed steps, by kind.",
         [(f"sum by (kind, event) (increase(ca_authority_events_total{{{N}}}[{RI}]))",
           "{{kind}} {{event}}")], w=24,
         field={"custom": {"drawStyle": "bars", "fillOpacity": 80}})
    b.write()


def cluster():
    b = Board("ca-cluster", "CA / Cluster",
              "Raft leadership, replication, proposals, snapshots and node health.",
              "ca_node_build_info")
    b.stat("Leader", "Which node leads.", [(f"ca_raft_leader{{{N}}}", "{{instance}}")], w=8,
           mappings=[{"type": "value", "options": {
               "0": {"text": "follower", "color": "text"}, "1": {"text": "LEADER", "color": "green"}}}])
    b.stat("Term", "Raft term (grows at each election).", [("max(ca_raft_term)", "term")], w=4)
    b.stat("Leader changes (1h)", "Elections seen by the node that saw most.",
           [("max(increase(ca_raft_leader_changes_total[1h]))", "changes")], w=4)
    b.stat("Members", "Voters in the membership.", [("max(ca_raft_members)", "members")], w=4)
    b.stat("Nodes up", "Scraped successfully.", [('sum(up{job="ca-node"})', "up")], w=4)
    b.ts("Applied and last log index", "Per node.",
         [(f"ca_raft_applied_index{{{N}}}", "applied {{instance}}"),
          (f"ca_raft_last_log_index{{{N}}}", "log {{instance}}")])
    b.ts("Replication lag (entries, from the leader)", "How far each member's log is behind.",
         [("max by (peer) (ca_raft_replication_lag_entries)", "member {{peer}}")])
    b.ts("Proposals per second", "Writes through Raft, by node and result.",
         [(f"sum by (instance, result) (rate(ca_raft_proposals_total{{{N}}}[{RI}]))",
           "{{instance}} {{result}}")], "ops")
    b.ts("Proposal latency (p99)", "From proposing to applied, by node.",
         [(f"histogram_quantile(0.99, sum by (le, instance) (rate(ca_raft_proposal_seconds_bucket{{{N}}}[{RI}])))",
           "{{instance}}")], "s")
    b.ts("Snapshots", "Snapshots built and installed in the last hour, by node.",
         [(f"sum by (instance, event) (increase(ca_raft_snapshots_total{{{N}}}[1h]))",
           "{{instance}} {{event}}")], w=8)
    b.ts("Snapshot duration (longest, 1h)", "Time to build or install a snapshot.",
         [(f"histogram_quantile(1, sum by (le, event) (rate(ca_raft_snapshot_seconds_bucket{{{N}}}[1h])))",
           "{{event}}")], "s", w=8)
    b.ts("Quorum acknowledgement age (leader)", "Time since a quorum last acknowledged the leader.",
         [(f"ca_raft_quorum_ack_age_seconds{{{N}}}", "{{instance}}")], "s", w=8)
    b.row("Node health")
    b.ts("Clock offset to each member", "Their clock minus this node's; a node off by more than "
         "max_clock_skew_secs stops minting.",
         [(f"ca_node_clock_offset_seconds{{{N}}}", "{{instance}} vs {{peer}}")], "s", w=8)
    b.ts("Data dir free space", "Below 64 MiB readiness warns; at 0 Raft stops until room is made.",
         [(f"ca_node_data_dir_free_bytes{{{N}}}", "{{instance}}")], "bytes", w=8)
    b.ts("CPU", "Cores busy, per node.",
         [(f'rate(process_cpu_seconds_total{{job="ca-node",{N}}}[{RI}])', "{{instance}}")],
         "short", w=8)
    b.ts("Memory (RSS)", "Resident memory, per node.",
         [(f'process_resident_memory_bytes{{job="ca-node",{N}}}', "{{instance}}")], "bytes", w=8)
    b.ts("Open file descriptors", "Per node (connections included).",
         [(f'process_open_fds{{job="ca-node",{N}}}', "{{instance}}")], w=8)
    b.panel("table", "Versions", "Build running on each node.",
            [("ca_node_build_info", "{{instance}} {{version}}")], w=8,
            options={"showHeader": True})
    b.write()


def agents():
    A = 'instance=~"$agent"'
    b = Board("ca-agents", "CA / Agents & workloads",
              "Agents, Workload API traffic, SVID expiry headroom and sync freshness.",
              "ca_agent_build_info", var="agent", label="Agent")
    b.stat("Agents up", "Agents scraped successfully.", [('sum(up{job="agent"})', "agents")])
    b.stat("SVIDs cached", "X.509-SVIDs held for workloads, all agents.",
           [(f"sum(ca_agent_svids_cached{{{A}}})", "SVIDs")])
    b.stat("Least SVID headroom", "Time until the earliest cached SVID expires, worst agent.",
           [(f"min(ca_agent_svid_earliest_expiry_timestamp_seconds{{{A}}}) - time()", "headroom")], "s")
    b.stat("Oldest sync", "Time since the agent that synced longest ago last synced.",
           [(f"time() - min(ca_agent_last_sync_success_timestamp_seconds{{{A}}})", "age")], "s")
    b.ts("Workload API requests per second", "By method and gRPC code.",
         [(f"sum by (method, code) (rate(ca_agent_workload_api_requests_total{{{A}}}[{RI}]))",
           "{{method}} {{code}}")], "ops")
    b.ts("Open Workload API streams", "Watches held by workloads, by method.",
         [(f"sum by (method) (ca_agent_workload_api_streams_open{{{A}}})", "{{method}}")])
    b.ts("SVID expiry headroom", "Per agent: time until its earliest cached SVID expires "
         "(renewed at half-life).",
         [(f"ca_agent_svid_earliest_expiry_timestamp_seconds{{{A}}} - time()", "{{instance}}"),
          (f"ca_agent_own_svid_expiry_timestamp_seconds{{{A}}} - time()", "agent SVID {{instance}}")],
         "s")
    b.ts("Sync freshness", "Time since each agent's last successful sync.",
         [(f"time() - ca_agent_last_sync_success_timestamp_seconds{{{A}}}", "{{instance}}")], "s")
    b.ts("Syncs and SVID rotations per second", "By result.",
         [(f"sum by (result) (rate(ca_agent_syncs_total{{{A}}}[{RI}]))", "sync {{result}}"),
          (f"sum by (result) (rate(ca_agent_svid_rotations_total{{{A}}}[{RI}]))", "rotation {{result}}")],
         "ops")
    b.ts("Fail-overs and bundle updates", "Node fail-overs and trust bundle changes pushed to workloads.",
         [(f"sum by (instance) (increase(ca_agent_node_failovers_total{{{A}}}[{RI}]))", "fail-overs {{instance}}"),
          (f"sum by (instance) (increase(ca_agent_bundle_updates_total{{{A}}}[{RI}]))", "bundle updates {{instance}}")])
    b.ts("Agent CPU", "Cores busy.",
         [(f'rate(process_cpu_seconds_total{{job="agent",{A}}}[{RI}])', "{{instance}}")])
    b.ts("Agent memory (RSS)", "Resident memory.",
         [(f'process_resident_memory_bytes{{job="agent",{A}}}', "{{instance}}")], "bytes")
    b.write()


if __name__ == "__main__":
    issuance()
    rotation()
    cluster()
    agents()
