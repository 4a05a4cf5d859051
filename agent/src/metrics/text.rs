//! Prometheus text format 0.0.4 from prometheus-client's OpenMetrics
//! output, for scrapers that do not ask for OpenMetrics (curl, promtool,
//! older Prometheus). prometheus-client only writes OpenMetrics, whose
//! `info` type, `# UNIT` and `# EOF` lines and counter family names (the
//! name without `_total`) the 0.0.4 parser rejects or misreads; this pass
//! rewrites those and nothing else.

use std::collections::HashMap;

/// Whether the client asked for OpenMetrics (Prometheus does).
pub(super) fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|accept| accept.contains("application/openmetrics-text"))
}

pub(super) fn to_prometheus_text(openmetrics: &str) -> String {
    // Family name -> its OpenMetrics type.
    let types: HashMap<&str, &str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .collect();
    let renamed = |family: &str| -> (String, &'static str) {
        match types.get(family).copied() {
            Some("counter") => (format!("{family}_total"), "counter"),
            Some("info") => (format!("{family}_info"), "gauge"),
            Some("gauge") => (family.to_owned(), "gauge"),
            Some("histogram") => (family.to_owned(), "histogram"),
            Some("summary") => (family.to_owned(), "summary"),
            _ => (family.to_owned(), "untyped"),
        }
    };
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (family, help) = rest.split_once(' ').unwrap_or((rest, ""));
            // 0.0.4 escapes only backslash and newline in HELP.
            let help = help.replace("\\\"", "\"");
            out.push_str(&format!("# HELP {} {help}\n", renamed(family).0));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let family = rest.split_once(' ').map_or(rest, |(f, _)| f);
            let (name, kind) = renamed(family);
            out.push_str(&format!("# TYPE {name} {kind}\n"));
        } else if line
            .split(['{', ' '])
            .next()
            .is_some_and(|name| name.ends_with("_created"))
        {
            // OpenMetrics creation timestamps have no 0.0.4 meaning.
            continue;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_info_units_and_eof_are_rewritten() {
        let openmetrics = "# HELP farol_agent Build \\\"x\\\".\n# TYPE farol_agent info\nfarol_agent_info{node=\"a\"} 1\n\
# HELP farol_x Things.\n# TYPE farol_x counter\n# UNIT farol_x things\nfarol_x_total 3\nfarol_x_created 17.0\n\
# HELP farol_g A gauge.\n# TYPE farol_g gauge\nfarol_g 2\n# EOF\n";
        let text = to_prometheus_text(openmetrics);
        assert_eq!(
            text,
            "# HELP farol_agent_info Build \"x\".\n# TYPE farol_agent_info gauge\nfarol_agent_info{node=\"a\"} 1\n\
# HELP farol_x_total Things.\n# TYPE farol_x_total counter\nfarol_x_total 3\n\
# HELP farol_g A gauge.\n# TYPE farol_g gauge\nfarol_g 2\n"
        );
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
        )));
        assert!(!wants_openmetrics(Some("*/*")));
    }
}
