//! The report's plots as SVG text, written by hand: two kinds of plot
//! (a latency strip per backend on a log axis, and a tenure timeline) need
//! rectangles, lines and text only, which is less code than adapting a
//! plotting crate's chart model (and `plotters` would pull in font
//! rendering for its own text layout).

use std::collections::BTreeMap;
use std::fmt::Write;

use super::history::{End, FaultKind, History};
use super::measure::percentiles;

const PALETTE: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f",
];

fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// One row per backend: every sample as a dot on a logarithmic millisecond
/// axis, with p50 (thick tick) and p99 (thin tick).
pub fn distribution(title: &str, rows: &[(String, Vec<f64>)]) -> String {
    let (left, right, top, row_h) = (150.0, 30.0, 50.0, 46.0);
    let width = 900.0;
    let height = top + row_h * rows.len() as f64 + 50.0;
    let all: Vec<f64> = rows.iter().flat_map(|(_, s)| s.iter().copied()).collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min).max(0.01);
    let hi = all.iter().copied().fold(0.0, f64::max).max(lo * 10.0);
    let (lo_dec, hi_dec) = (lo.log10().floor(), hi.log10().ceil());
    let floor = 10f64.powf(lo_dec);
    let x = |v: f64| {
        left + (v.max(floor).log10() - lo_dec) / (hi_dec - lo_dec) * (width - left - right)
    };
    let mut svg = svg_open(width, height, title, 24.0);
    let axis_y = top + row_h * rows.len() as f64;
    let mut dec = lo_dec;
    while dec <= hi_dec {
        let v = 10f64.powf(dec);
        let label = if v >= 1000.0 {
            format!("{} s", v / 1000.0)
        } else {
            format!("{v} ms")
        };
        let _ = write!(
            svg,
            r##"<line x1="{0:.1}" y1="{top}" x2="{0:.1}" y2="{axis_y}" stroke="#ddd"/><text x="{0:.1}" y="{1}" text-anchor="middle">{2}</text>"##,
            x(v),
            axis_y + 18.0,
            label
        );
        dec += 1.0;
    }
    for (i, (name, samples)) in rows.iter().enumerate() {
        let y = top + row_h * i as f64 + row_h / 2.0;
        let color = PALETTE[i % PALETTE.len()];
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            left - 10.0,
            y + 4.0,
            esc(name)
        );
        for (j, v) in samples.iter().enumerate() {
            // A small deterministic jitter so equal values stay visible.
            let dy = ((j * 7919) % 21) as f64 - 10.0;
            let _ = write!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}" fill-opacity="0.55"/>"#,
                x(*v),
                y + dy
            );
        }
        if let Some((p50, p99, _)) = percentiles(samples) {
            // Labels near the right edge go to the left of the tick.
            let flip = x(p50) > width - 260.0;
            let _ = write!(
                svg,
                r##"<line x1="{0:.1}" y1="{1}" x2="{0:.1}" y2="{2}" stroke="#222" stroke-width="3"/><line x1="{3:.1}" y1="{1}" x2="{3:.1}" y2="{2}" stroke="#222" stroke-width="1"/><text x="{4:.1}" y="{5}" fill="#222" text-anchor="{9}">p50 {6:.1} ms · p99 {7:.1} ms · n={8}</text>"##,
                x(p50),
                y - 16.0,
                y + 16.0,
                x(p99),
                if flip { x(p50) - 6.0 } else { x(p50) + 6.0 },
                y - 17.0,
                p50,
                p99,
                samples.len(),
                if flip { "end" } else { "start" }
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

/// Who ran `id` when during one run: a lane per node, a bar per tenure
/// (red end: stopped with `conflict`; black: killed), faults shaded.
pub fn timeline(title: &str, history: &History, id: &str) -> String {
    let tenures: Vec<_> = history
        .tenures()
        .into_iter()
        .filter(|t| t.id == id)
        .collect();
    let mut nodes: Vec<String> = history
        .events
        .iter()
        .map(|e| e.node.clone())
        .chain(history.faults.iter().filter_map(|f| f.node.clone()))
        .collect();
    nodes.sort();
    nodes.dedup();
    let t0 = tenures
        .iter()
        .map(|t| t.start)
        .chain(history.faults.iter().map(|f| f.at))
        .min()
        .unwrap_or(0);
    let t1 = history.end.max(t0 + 1);
    let (left, right, top, lane) = (60.0, 20.0, 50.0, 34.0);
    let width = 1200.0;
    let height = top + lane * (nodes.len() as f64 + 1.0) + 60.0;
    let x =
        |t: u128| left + (t.saturating_sub(t0)) as f64 / (t1 - t0) as f64 * (width - left - right);
    let mut svg = svg_open(width, height, title, 22.0);
    let lanes_bottom = top + lane * nodes.len() as f64;
    let fault_colors: BTreeMap<FaultKind, &str> = [
        (FaultKind::Kill, "#e15759"),
        (FaultKind::Pause, "#edc948"),
        (FaultKind::Restart, "#76b7b2"),
        (FaultKind::Partition, "#b07aa1"),
        (FaultKind::BackendRestart, "#9c755f"),
        (FaultKind::Join, "#59a14f"),
        (FaultKind::Leave, "#bab0ac"),
        (FaultKind::Drain, "#4e79a7"),
    ]
    .into_iter()
    .collect();
    for f in &history.faults {
        let color = fault_colors[&f.kind];
        let (xa, xb) = (x(f.at), x(f.until).max(x(f.at) + 1.5));
        let lane_of = f
            .node
            .as_ref()
            .and_then(|n| nodes.iter().position(|m| m == n));
        let (y, h) = match lane_of {
            Some(i) => (top + lane * i as f64, lane),
            None => (top, lane * nodes.len() as f64),
        };
        let _ = write!(
            svg,
            r#"<rect x="{xa:.1}" y="{y:.1}" width="{:.1}" height="{h:.1}" fill="{color}" fill-opacity="0.25"><title>{} {}</title></rect>"#,
            xb - xa,
            f.kind,
            f.node.as_deref().unwrap_or("backend")
        );
    }
    for (i, n) in nodes.iter().enumerate() {
        let y = top + lane * i as f64;
        let _ = write!(
            svg,
            r##"<text x="{}" y="{:.1}" text-anchor="end">{}</text><line x1="{left}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#eee"/>"##,
            left - 8.0,
            y + lane / 2.0 + 4.0,
            esc(n),
            y + lane,
            width - right,
            y + lane
        );
    }
    for t in &tenures {
        let i = nodes.iter().position(|n| *n == t.node).unwrap_or(0);
        let color = PALETTE[i % PALETTE.len()];
        let y = top + lane * i as f64 + 8.0;
        let (xa, xb) = (x(t.start), x(t.end).max(x(t.start) + 1.0));
        let _ = write!(
            svg,
            r#"<rect x="{xa:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{color}"><title>token {} ({:?})</title></rect>"#,
            xb - xa,
            lane - 16.0,
            t.token,
            t.how
        );
        let end_mark = match &t.how {
            End::Stopped(r) if r == "conflict" => Some("#d00"),
            End::Killed => Some("#000"),
            _ => None,
        };
        if let Some(c) = end_mark {
            let _ = write!(
                svg,
                r#"<rect x="{:.1}" y="{:.1}" width="3" height="{:.1}" fill="{c}"/>"#,
                xb - 1.5,
                y - 4.0,
                lane - 8.0
            );
        }
    }
    // Time axis and legend.
    let secs = (t1 - t0) as f64 / 1e9;
    let step = [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0]
        .into_iter()
        .find(|s| secs / s <= 12.0)
        .unwrap_or(1200.0);
    let mut s = 0.0;
    while s <= secs {
        let xs = x(t0 + (s * 1e9) as u128);
        let _ = write!(
            svg,
            r##"<line x1="{xs:.1}" y1="{lanes_bottom}" x2="{xs:.1}" y2="{:.1}" stroke="#999"/><text x="{xs:.1}" y="{:.1}" text-anchor="middle">{s} s</text>"##,
            lanes_bottom + 5.0,
            lanes_bottom + 18.0
        );
        s += step;
    }
    let mut lx = left;
    let ly = lanes_bottom + 42.0;
    for (kind, color) in &fault_colors {
        let _ = write!(
            svg,
            r#"<rect x="{lx}" y="{}" width="14" height="12" fill="{color}" fill-opacity="0.35"/><text x="{}" y="{ly}">{kind}</text>"#,
            ly - 10.0,
            lx + 18.0
        );
        lx += 130.0;
    }
    let _ = write!(
        svg,
        r##"<rect x="{lx}" y="{}" width="3" height="12" fill="#d00"/><text x="{}" y="{ly}">stopped: conflict</text>"##,
        ly - 10.0,
        lx + 8.0
    );
    lx += 140.0;
    let _ = write!(
        svg,
        r##"<rect x="{lx}" y="{}" width="3" height="12" fill="#000"/><text x="{}" y="{ly}">killed</text>"##,
        ly - 10.0,
        lx + 8.0
    );
    svg.push_str("</svg>\n");
    svg
}

/// The opening of a plot: the `<svg>` element, a white background and the
/// title centred at `title_y`.
fn svg_open(width: f64, height: f64, title: &str, title_y: f64) -> String {
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        svg,
        r##"<rect width="100%" height="100%" fill="white"/><text x="{}" y="{title_y}" font-size="15" text-anchor="middle">{}</text>"##,
        width / 2.0,
        esc(title)
    );
    svg
}
