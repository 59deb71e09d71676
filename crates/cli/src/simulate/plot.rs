//! Small SVG charts for the load report: lines over time and grouped bars (linear or log), drawn
//! by hand so that the project needs no plotting library.

use std::fmt::Write;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 360.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
pub(crate) const COLORS: [&str; 6] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn frame(title: &str, y_label: &str, x_label: &str) -> String {
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>
<text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">{}</text>
<text x="{}" y="{}" text-anchor="middle">{}</text>
<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{}" stroke="black"/>
<line x1="{LEFT}" y1="{}" x2="{}" y2="{}" stroke="black"/>
"##,
        WIDTH / 2.0,
        escape(title),
        HEIGHT / 2.0,
        HEIGHT / 2.0,
        escape(y_label),
        LEFT + (WIDTH - LEFT - RIGHT) / 2.0,
        HEIGHT - 12.0,
        escape(x_label),
        HEIGHT - BOTTOM,
        HEIGHT - BOTTOM,
        WIDTH - RIGHT,
        HEIGHT - BOTTOM,
    );
    svg
}

fn legend(svg: &mut String, names: &[&str]) {
    for (i, name) in names.iter().enumerate() {
        let y = TOP + 10.0 + i as f64 * 20.0;
        let x = WIDTH - RIGHT + 15.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            y - 10.0,
            COLORS[i % COLORS.len()],
            x + 18.0,
            y,
            escape(name)
        );
    }
}

/// A y-axis tick label: compact, with the unit left to the axis title.
fn tick(value: f64) -> String {
    if value >= 10.0 {
        format!("{value:.0}")
    } else if value >= 1.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// Lines of `(x, y)` points, linear axes from zero; the y axis up to `y_top`, or to the
/// largest value.
pub(crate) fn lines(
    title: &str,
    x_label: &str,
    y_label: &str,
    y_top: Option<f64>,
    series: &[(&str, Vec<(f64, f64)>)],
) -> String {
    let mut svg = frame(title, y_label, x_label);
    let x_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(x, _)| *x))
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let y_max = y_top.unwrap_or_else(|| {
        series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
            .fold(0.0f64, f64::max)
            .max(1e-9)
    });
    let (plot_w, plot_h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let sx = |x: f64| LEFT + x / x_max * plot_w;
    let sy = |y: f64| HEIGHT - BOTTOM - y / y_max * plot_h;
    for i in 0..=4 {
        let y = y_max * f64::from(i) / 4.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{0}" x2="{1}" y2="{0}" stroke="#ddd"/><text x="{2}" y="{3}" text-anchor="end">{4}</text>"##,
            sy(y),
            WIDTH - RIGHT,
            LEFT - 6.0,
            sy(y) + 4.0,
            tick(y)
        );
        let x = x_max * f64::from(i) / 4.0;
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            sx(x),
            HEIGHT - BOTTOM + 16.0,
            tick(x)
        );
    }
    for (i, (_, points)) in series.iter().enumerate() {
        let path: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
            COLORS[i % COLORS.len()],
            path.join(" ")
        );
    }
    legend(
        &mut svg,
        &series.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
    );
    svg.push_str("</svg>\n");
    svg
}

/// Grouped bars: one group per label, one bar per series name; `log` for a log-10 y axis.
pub(crate) fn bars(
    title: &str,
    y_label: &str,
    series_names: &[&str],
    groups: &[(String, Vec<f64>)],
    log: bool,
) -> String {
    let mut svg = frame(title, y_label, "");
    let (plot_w, plot_h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let values = groups.iter().flat_map(|(_, v)| v.iter().copied());
    let (lo, hi) = if log {
        let positive: Vec<f64> = values.filter(|v| *v > 0.0).collect();
        let lo = positive
            .iter()
            .copied()
            .fold(f64::MAX, f64::min)
            .log10()
            .floor();
        let hi = positive
            .iter()
            .copied()
            .fold(0.0f64, f64::max)
            .log10()
            .ceil();
        (lo.min(hi - 1.0), hi)
    } else {
        (0.0, values.fold(0.0f64, f64::max).max(1e-9) * 1.1)
    };
    let scale = |v: f64| {
        let v = if log {
            v.max(10f64.powf(lo)).log10()
        } else {
            v
        };
        HEIGHT - BOTTOM - (v - lo) / (hi - lo) * plot_h
    };
    let ticks: Vec<f64> = if log {
        (lo as i32..=hi as i32).map(|p| 10f64.powi(p)).collect()
    } else {
        (0..=4).map(|i| hi * f64::from(i) / 4.0).collect()
    };
    for t in ticks {
        let y = scale(t);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            WIDTH - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            tick(t)
        );
    }
    let group_w = plot_w / groups.len().max(1) as f64;
    let bar_w = group_w * 0.8 / series_names.len().max(1) as f64;
    for (g, (label, values)) in groups.iter().enumerate() {
        let x0 = LEFT + g as f64 * group_w + group_w * 0.1;
        for (i, v) in values.iter().enumerate() {
            let y = scale(*v);
            let _ = writeln!(
                svg,
                r#"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}</title></rect>"#,
                x0 + i as f64 * bar_w,
                bar_w * 0.95,
                (HEIGHT - BOTTOM - y).max(0.0),
                COLORS[i % COLORS.len()],
                tick(*v)
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            x0 + group_w * 0.4,
            HEIGHT - BOTTOM + 16.0,
            escape(label)
        );
    }
    legend(&mut svg, series_names);
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_well_formed_svg() {
        let l = lines(
            "t <1>",
            "s",
            "share",
            Some(1.0),
            &[("memory", vec![(0.0, 0.5), (1.0, 0.7)])],
        );
        assert!(l.starts_with("<svg") && l.trim_end().ends_with("</svg>"));
        assert!(l.contains("polyline") && l.contains("t &lt;1&gt;"));
        let b = bars(
            "latency",
            "µs",
            &["p50", "p99"],
            &[
                ("memory".into(), vec![0.3, 1.0]),
                ("redis".into(), vec![800.0, 2000.0]),
            ],
            true,
        );
        assert_eq!(
            b.matches("<rect x=").count(),
            4 + 2,
            "bars and legend swatches"
        );
        let linear = bars("q", "n", &["a"], &[("x".into(), vec![0.0])], false);
        assert!(linear.contains("<rect"));
    }
}
