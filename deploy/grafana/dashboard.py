#!/usr/bin/env python3
# Writes deploy/grafana/xdpgate-dashboard.json (run from the repository root). Edit here, not
# the JSON; `cargo test -p xdpgate --lib metrics` checks every metric it uses is served.
import json
ds = {"type": "prometheus", "uid": "${datasource}"}
panels = []
pid = 0
def panel(title, exprs, unit="short", kind="timeseries", w=12, h=8, desc=""):
    global pid
    pid += 1
    p = {
        "id": pid, "type": kind, "title": title, "description": desc, "datasource": ds,
        "gridPos": {"h": h, "w": w, "x": 0, "y": 0},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": chr(65 + i), "datasource": ds, "expr": e, "legendFormat": l} for i, (e, l) in enumerate(exprs)],
    }
    if kind == "stat":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value"}
    if kind == "table":
        p["targets"][0]["format"] = "table"
        p["targets"][0]["instant"] = True
    panels.append(p)
def row(title):
    global pid
    pid += 1
    panels.append({"id": pid, "type": "row", "title": title, "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": 0}, "panels": []})

S = 'instance=~"$instance"'
def m(name, extra=""):
    return name + "{" + S + (", " + extra if extra else "") + "}"
R = "[$__rate_interval]"
FAIL = 'result="failure"'
row("Agent")
panel("Build", [(m("xdpgate_build_info"), "{{instance}} {{version}}")], kind="table", w=6, h=5)
panel("Last reload successful", [(m("xdpgate_config_last_reload_successful"), "{{instance}}")], kind="stat", w=6, h=5, desc="0: the last reload failed and the previous policy stays in force.")
panel("Policy generation", [(m("xdpgate_policy_generation"), "{{instance}}")], kind="stat", w=6, h=5)
panel("Policy age", [("time() - " + m("xdpgate_policy_applied_timestamp_seconds"), "{{instance}}")], unit="s", kind="stat", w=6, h=5, desc="Seconds since the running policy was applied.")
row("Traffic and drops")
panel("Packets by interface and verdict", [(f"sum by (interface, verdict) (rate({m('xdpgate_interface_packets_total')}{R}))", "{{interface}} {{verdict}}")], unit="pps")
panel("Bytes by interface and verdict", [(f"sum by (interface, verdict) (rate({m('xdpgate_interface_bytes_total')}{R}))", "{{interface}} {{verdict}}")], unit="Bps")
panel("Drops by reason", [(f"sum by (reason) (rate({m('xdpgate_drops_total')}{R}))", "{{reason}}")], unit="pps")
panel("Host egress packets by verdict", [(f"sum by (interface, verdict) (rate({m('xdpgate_interface_egress_packets_total')}{R}))", "{{interface}} {{verdict}}")], unit="pps")
panel("Top rules by flows decided", [(f"topk(10, sum by (nsg, rule) (rate({m('xdpgate_rule_flows_total')}{R})))", "{{nsg}}/{{rule}}")], unit="ops", w=24)
row("Load balancers")
panel("Frontend packets", [(f"sum by (load_balancer, rule) (rate({m('xdpgate_frontend_packets_total')}{R}))", "{{load_balancer}}/{{rule}}")], unit="pps")
panel("Backend share of packets", [(f"sum by (backend) (rate({m('xdpgate_backend_packets_total')}{R}))", "{{backend}}")], unit="pps", desc="One series per backend, over every rule it serves.")
panel("Health (percent of probed backends healthy)", [(m("xdpgate_load_balancer_health_percent"), "{{load_balancer}}/{{rule}}")], unit="percent")
panel("Backends by state", [(f"sum by (load_balancer, rule, state) ({m('xdpgate_load_balancer_backends')})", "{{load_balancer}}/{{rule}} {{state}}")], desc="unprobed: a rule without a probe (inbound NAT rules); its backends' health is unknown.")
panel("Probe latency (mean)", [(f"sum by (backend, probe) (rate({m('xdpgate_probe_duration_seconds_total')}{R})) / sum by (backend, probe) (rate({m('xdpgate_probes_total')}{R}))", "{{backend}} {{probe}}")], unit="s")
panel("Probe failures", [(f"sum by (backend, probe) (rate({m('xdpgate_probes_total', FAIL)}{R}))", "{{backend}} {{probe}}")], unit="ops")
row("NAT gateways")
panel("Active translations", [(m("xdpgate_nat_translations"), "{{gateway}}")])
panel("New translations", [(f"sum by (gateway) (rate({m('xdpgate_nat_translations_created_total')}{R}))", "{{gateway}}")], unit="ops", desc="New flows that got a public port (Azure's SNAT connection count).")
panel("Ports in use per public address", [(f"{m('xdpgate_nat_ports_in_use')} / on (instance, gateway) group_left {m('xdpgate_nat_ports_per_address')}", "{{gateway}} {{address}}")], unit="percentunit", desc="Ports held (or cooling down) over the port range; a port serves one translation per destination.")
panel("New flows with no free port", [(f"sum by (gateway) (rate({m('xdpgate_nat_allocation_failures_total')}{R}))", "{{gateway}}")], unit="ops")
panel("Translated packets", [(f"sum by (gateway, direction) (rate({m('xdpgate_nat_packets_total')}{R}))", "{{gateway}} {{direction}}")], unit="pps", desc="Azure's Packets metric: outbound (private hosts to the internet) and inbound (their replies).")
panel("Translated bytes", [(f"sum by (gateway, direction) (rate({m('xdpgate_nat_bytes_total')}{R}))", "{{gateway}} {{direction}}")], unit="Bps", desc="Azure's Bytes metric: from the IP header on.")
panel("NAT drops by gateway", [(f"sum by (gateway, reason) (rate({m('xdpgate_nat_dropped_packets_total')}{R}))", "{{gateway}} {{reason}}")], unit="pps", w=24, desc="Azure's Dropped Packets: nat_exhausted (no free port for a new flow), nat_unmatched (to a public address, no translation: scans, or replies after a translation idled out).")
row("Flow table")
panel("Flow table use", [(f"{m('xdpgate_flow_table_entries')} / on (instance, table) (2 * {m('xdpgate_flow_table_capacity')})", "{{table}}")], unit="percentunit")
panel("Embryonic flows by outcome", [(f"sum by (outcome) (rate({m('xdpgate_embryonic_flows_total')}{R}))", "{{outcome}}"), (f"sum (rate({m('xdpgate_embryonic_confirmations_refused_total')}{R}))", "confirmations refused")], unit="ops", desc="Refused confirmations (the established table full) leave their flows in the embryonic table, assured, passing.")
panel("Flows rebuilt and picked up", [(f"rate({m('xdpgate_flows_rebuilt_total')}{R})", "rebuilt"), (f"rate({m('xdpgate_flows_picked_up_total')}{R})", "picked up")], unit="ops")
panel("Flow-log events held back", [(f"sum by (reason) (rate({m('xdpgate_flow_events_dropped_total')}{R}))", "{{reason}}")], unit="ops")
panel("Established flow entries", [(m("xdpgate_flows"), "{{instance}}")], w=24)

x = 0; y = 0; rowh = 0
for p in panels:
    g = p["gridPos"]
    if p["type"] == "row":
        y += rowh
        g["y"] = y; y += 1; x = 0; rowh = 0
        continue
    if x + g["w"] > 24:
        y += rowh; x = 0; rowh = 0
    g["x"], g["y"] = x, y
    x += g["w"]; rowh = max(rowh, g["h"])

dash = {
    "title": "xdpgate",
    "uid": "xdpgate",
    "description": "xdpgate: traffic, drops, rules, load balancers (health, probes), NAT gateways, flow table; from `xdpgate run --metrics-addr`. Written by deploy/grafana/dashboard.py; every metric it uses is checked to be served (userspace/src/metrics.rs tests).",
    "tags": ["xdpgate", "xdp", "ebpf"],
    "timezone": "utc",
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "refresh": "30s",
    "time": {"from": "now-6h", "to": "now"},
    "templating": {"list": [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
        {"name": "instance", "type": "query", "datasource": ds, "query": "label_values(xdpgate_build_info, instance)", "refresh": 2, "includeAll": True, "multi": True, "current": {"text": "All", "value": "$__all"}, "label": "Instance"},
    ]},
    "annotations": {"list": []},
    "panels": panels,
}
with open("deploy/grafana/xdpgate-dashboard.json", "w") as f:
    json.dump(dash, f, indent=2)
    f.write("\n")
print(len(panels))
