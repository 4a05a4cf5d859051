//! The status page: one self-contained HTML document in the spirit of
//! HAProxy's stats page (a table per service, a colour per state), that
//! refreshes itself every few seconds, needs no script, font or image from
//! anywhere, and reads on a phone (one column, tables scroll sideways).

use std::fmt::Write as _;

use super::status::Status;

/// Seconds between refreshes.
pub const REFRESH_SECONDS: u32 = 2;

/// Text safe inside HTML elements and attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "\
body{font-family:system-ui,sans-serif;margin:0.5em;background:#f4f4f4;color:#222}\
h1{font-size:1.2em;margin:0.2em 0}h2{font-size:1.05em;margin:1em 0 0.3em}\
.meta{color:#555;font-size:0.9em}.scroll{overflow-x:auto}\
table{border-collapse:collapse;font-size:0.9em;background:#fff;min-width:100%}\
th,td{border:1px solid #ccc;padding:0.25em 0.5em;text-align:left;white-space:nowrap}\
th{background:#ddd}td.n{text-align:right}\
tr.up td.s{background:#8fd18f}tr.down td.s,tr.unreachable td.s{background:#f08080}\
tr.drain td.s{background:#8fb8ef}tr.maint td.s{background:#c8a2e8}\
.master{color:#060;font-weight:bold}.backup{color:#666}";

pub fn render(status: &Status) -> String {
    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
<meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
<title>Farol {} - {}</title><style>{STYLE}</style></head><body>",
        escape(&status.cluster),
        escape(&status.node)
    );
    let _ = write!(
        html,
        "<h1>Farol: {} / {}</h1><p class=\"meta\">agent {} &middot; admin state <b id=\"admin\">{}</b> &middot; \
refreshes every {REFRESH_SECONDS} s &middot; <a href=\"/status.json\">JSON</a> &middot; <a href=\"/metrics\">metrics</a></p>",
        escape(&status.cluster),
        escape(&status.node),
        escape(&status.version),
        status.admin.label()
    );
    if let Some(xdp) = &status.xdp {
        let _ = write!(
            html,
            "<p class=\"meta\">XDP on {}: <b id=\"xdp-mode\">{}</b> mode</p>",
            escape(&xdp.interface),
            escape(&xdp.mode)
        );
    }
    if !status.vips.is_empty() {
        html.push_str(
            "<h2>VIPs</h2><div class=\"scroll\"><table><tr><th>VIP</th><th>role</th></tr>",
        );
        for vip in &status.vips {
            let _ = write!(
                html,
                "<tr><td>{}</td><td class=\"{}\">{}</td></tr>",
                escape(&vip.vip),
                escape(&vip.role),
                escape(&vip.role)
            );
        }
        html.push_str("</table></div>");
    }
    for service in &status.services {
        let _ = write!(
            html,
            "<h2 id=\"service-{}\">{} &mdash; {}:{}/{} ({})</h2><p class=\"meta\">check: {} &middot; new flows {} &middot; dropped (no backend) {}</p>",
            escape(&service.name),
            escape(&service.name),
            escape(&service.vip),
            escape(&service.ports),
            escape(&service.protocol),
            escape(&service.scheduler),
            escape(service.check.as_deref().unwrap_or("none")),
            service.new_flows,
            service.dropped_no_backend
        );
        html.push_str(
            "<div class=\"scroll\"><table><tr><th>backend</th><th>state</th><th>last check</th>\
<th>latency</th><th>weight</th><th>flows</th><th>new flows</th><th>packets</th>\
<th>checks ok/failed</th><th>changes</th><th>address</th></tr>",
        );
        for b in &service.backends {
            let weight = if b.weight == b.configured_weight {
                b.weight.to_string()
            } else {
                format!("{} / {}", b.weight, b.configured_weight)
            };
            let latency = b
                .last_check_latency_ms
                .map_or("-".to_owned(), |ms| format!("{ms:.1} ms"));
            let _ = write!(
                html,
                "<tr class=\"{state}\" data-backend=\"{name}\"><td>{name}</td><td class=\"s\">{state}</td>\
<td>{}</td><td class=\"n\">{latency}</td>\
<td class=\"n\">{weight}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
<td class=\"n\">{}/{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
                escape(b.last_check.as_deref().unwrap_or("-")),
                b.active_flows,
                b.new_flows,
                b.packets,
                b.checks_passed,
                b.checks_failed,
                b.state_changes,
                escape(&b.address),
                state = escape(&b.state),
                name = escape(&b.name),
            );
        }
        html.push_str("</table></div>");
    }
    html.push_str("</body></html>\n");
    html
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        control::status::{BackendRow, ServiceStatus, VipStatus},
        health::AdminState,
    };

    #[test]
    fn the_page_escapes_text_refreshes_and_loads_nothing_external() {
        let status = Status {
            cluster: "lab".into(),
            node: "n<1>".into(),
            version: "0".into(),
            admin: AdminState::Ready,
            vips: vec![VipStatus {
                vip: "192.0.2.100".into(),
                role: "master".into(),
            }],
            services: vec![ServiceStatus {
                name: "web".into(),
                vip: "192.0.2.100".into(),
                ports: "80".into(),
                protocol: "tcp".into(),
                scheduler: "maglev".into(),
                check: None,
                packets: 0,
                new_flows: 0,
                dropped_no_backend: 0,
                backends: vec![BackendRow {
                    name: "nuster2".into(),
                    address: "192.0.2.12:80".into(),
                    state: "down".into(),
                    alive: false,
                    weight: 0,
                    configured_weight: 100,
                    admin: AdminState::Ready,
                    check_state: "down".into(),
                    last_check: Some("HTTP status 503 not in <200-399>".into()),
                    last_check_latency_ms: Some(1.5),
                    last_check_passed: Some(false),
                    checks_passed: 1,
                    checks_failed: 3,
                    state_changes: 1,
                    active_flows: 0,
                    new_flows: 7,
                    packets: 70,
                    slowstart: None,
                }],
            }],
            cluster_state: None,
            xdp: Some(crate::control::status::XdpStatus {
                interface: "eth<0>".into(),
                mode: "generic".into(),
            }),
        };
        let html = render(&status);
        assert!(
            html.contains("XDP on eth&lt;0&gt;: <b id=\"xdp-mode\">generic</b> mode"),
            "{html}"
        );
        assert!(html.contains("http-equiv=\"refresh\""));
        assert!(html.contains("name=\"viewport\""));
        assert!(html.contains("n&lt;1&gt;"));
        assert!(html.contains("&lt;200-399&gt;"));
        assert!(html.contains("<tr class=\"down\" data-backend=\"nuster2\">"));
        assert!(!html.contains("src="), "no external assets");
        assert!(!html.contains("<link"), "no external stylesheets");
    }
}
