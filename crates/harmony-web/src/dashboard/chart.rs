//! Line charts drawn on the server as inline SVG (no script, no CDN): one line per type over
//! the chart ring's window. Type names are escaped like every other text.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::live::{CHART_WINDOW, Sample, TypeSample};
use super::units::escape;

/// Most lines in one chart (the types with the largest values; the rest are left out and
/// the legend says so).
pub const CHART_LINES_MAX: usize = 8;

const WIDTH: f64 = 600.0;
const HEIGHT: f64 = 160.0;
const PAD_LEFT: f64 = 44.0;
const PAD_BOTTOM: f64 = 18.0;
const PAD_TOP: f64 = 8.0;

/// Line colours, told apart in light and dark mode (more types than colours repeat them).
const PALETTE: [&str; CHART_LINES_MAX] = [
    "#2f7ed8", "#e4572e", "#29a36a", "#b07aa1", "#f2a900", "#17becf", "#8c564b", "#7f7f7f",
];

/// An SVG chart of `value` per type over the samples, ending at `now_ms`.
pub fn render(
    title: &str,
    unit: &str,
    samples: &[Sample],
    now_ms: i64,
    value: fn(&TypeSample) -> f64,
) -> String {
    // The axis spans the samples there are, up to the whole window: a node that started a
    // minute ago shows that minute across the chart.
    let full_ms = i64::try_from(CHART_WINDOW.as_millis()).unwrap_or(i64::MAX) as f64;
    let first_ms = samples.first().map_or(now_ms, |s| s.at_ms) as f64;
    let window_ms = (now_ms as f64 - first_ms).clamp(1_000.0, full_ms);
    let start_ms = now_ms as f64 - window_ms;
    // Each type's peak decides which types get a line.
    let mut peaks: BTreeMap<&str, f64> = BTreeMap::new();
    for s in samples {
        for (name, ts) in &s.per_type {
            let p = peaks.entry(name.as_str()).or_insert(0.0);
            *p = p.max(value(ts));
        }
    }
    // A type keeps its colour across charts: by its place among every type sampled.
    let colour = |name: &str| {
        let i = peaks.keys().position(|n| *n == name).unwrap_or(0);
        PALETTE[i % PALETTE.len()]
    };
    let mut names: Vec<(&str, f64)> = peaks.iter().map(|(n, p)| (*n, *p)).collect();
    names.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    let left_out = names.len().saturating_sub(CHART_LINES_MAX);
    names.truncate(CHART_LINES_MAX);
    let max = names.iter().map(|(_, p)| *p).fold(0.0, f64::max);
    let top = nice_ceiling(max);
    let plot_w = WIDTH - PAD_LEFT;
    let plot_h = HEIGHT - PAD_BOTTOM - PAD_TOP;
    let x = |ms: i64| PAD_LEFT + ((ms as f64 - start_ms) / window_ms).clamp(0.0, 1.0) * plot_w;
    let y = |v: f64| PAD_TOP + plot_h - (v / top).clamp(0.0, 1.0) * plot_h;

    let mut svg = String::new();
    let span = super::units::duration_ms(window_ms as i64);
    let label = format!("{title} over the last {span}");
    let _ = write!(
        svg,
        r#"<figure class="chart"><figcaption>{}</figcaption><svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{}" preserveAspectRatio="none">"#,
        escape(title),
        escape(&label)
    );
    // Grid: bottom, middle and top lines with their values.
    for frac in [0.0, 0.5, 1.0] {
        let v = top * frac;
        let _ = write!(
            svg,
            r#"<line class="grid" x1="{PAD_LEFT}" x2="{WIDTH}" y1="{y:.1}" y2="{y:.1}"/><text class="axis" x="{tx}" y="{ty:.1}" text-anchor="end">{v}</text>"#,
            y = y(v),
            tx = PAD_LEFT - 4.0,
            ty = y(v) + 4.0,
            v = short_number(v),
        );
    }
    let _ = write!(
        svg,
        r#"<text class="axis" x="{PAD_LEFT}" y="{h}">−{span}</text><text class="axis" x="{WIDTH}" y="{h}" text-anchor="end">now</text>"#,
        h = HEIGHT - 4.0
    );
    for (name, _) in &names {
        let mut points = String::new();
        for s in samples {
            let v = s.per_type.get(*name).map_or(0.0, value);
            let _ = write!(points, "{:.1},{:.1} ", x(s.at_ms), y(v));
        }
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" vector-effect="non-scaling-stroke" points="{}"><title>{}</title></polyline>"#,
            colour(name),
            points.trim_end(),
            escape(name)
        );
        // The latest value as a dot: visible even while there is one sample only.
        if let Some(last) = samples.last() {
            let v = last.per_type.get(*name).map_or(0.0, value);
            let _ = write!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{}"/>"#,
                x(last.at_ms),
                y(v),
                colour(name)
            );
        }
    }
    svg.push_str("</svg><ul class=\"legend\">");
    if names.is_empty() {
        let _ = write!(
            svg,
            "<li class=\"muted\">no samples yet ({} while the page is open)</li>",
            escape(unit)
        );
    }
    for (name, peak) in &names {
        let _ = write!(
            svg,
            r#"<li><span class="swatch" style="background:{}"></span>{} <span class="muted">peak {} {}</span></li>"#,
            colour(name),
            escape(name),
            short_number(*peak),
            escape(unit)
        );
    }
    if left_out > 0 {
        let _ = write!(
            svg,
            "<li class=\"muted\">{left_out} more types not drawn</li>"
        );
    }
    svg.push_str("</ul></figure>");
    svg
}

/// 1, 2 or 5 times a power of ten at or above `v` (at least 1).
fn nice_ceiling(v: f64) -> f64 {
    if v <= 1.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * mag >= v {
            return m * mag;
        }
    }
    10.0 * mag
}

fn short_number(v: f64) -> String {
    if v >= 1_000_000.0 {
        format!("{:.1}M", v / 1_000_000.0)
    } else if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_per_type_and_escaped_names() {
        let mut per_type = BTreeMap::new();
        per_type.insert(
            "<b>".to_owned(),
            TypeSample {
                waiting: 5,
                done_per_s: 0.0,
            },
        );
        let samples = vec![
            Sample {
                at_ms: 1_000,
                per_type: per_type.clone(),
            },
            Sample {
                at_ms: 2_000,
                per_type,
            },
        ];
        let svg = render("Queue", "tasks", &samples, 2_000, |s| s.waiting as f64);
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert!(svg.contains("&lt;b&gt;") && !svg.contains("<b>"), "{svg}");
        assert_eq!(nice_ceiling(7.0), 10.0);
        assert_eq!(nice_ceiling(120.0), 200.0);
    }
}
