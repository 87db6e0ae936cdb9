//! `rtrs-perf plot`: interval logs (`--hist`, or any HdrHistogram interval
//! log in ns) to a percentile plot in SVG, one line per log and tag, side by
//! side, plus the figures as text. x: percentile on a log scale (50 ..
//! 99.999, as HdrHistogram's plotter draws it), y: latency in µs.

use crate::histlog;
use crate::report::histogram;
use hdrhistogram::Histogram;
use std::fmt::Write;

/// One line of the plot.
pub struct Series {
    pub name: String,
    pub hist: Histogram<u64>,
    /// Seconds from the log's first interval to the end of its last.
    pub secs: f64,
}

/// Reads the logs: each one's intervals merged per tag (`tag` keeps one).
pub fn load(paths: &[std::path::PathBuf], tag: Option<&str>) -> Result<Vec<Series>, String> {
    let mut out = Vec::new();
    for p in paths {
        let text = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
        let ivs = histlog::read(&text).map_err(|e| format!("{}: {e}", p.display()))?;
        let mut by_tag: Vec<Series> = Vec::new();
        for iv in ivs {
            let t = iv.tag.unwrap_or_default();
            if tag.is_some_and(|want| want != t) {
                continue;
            }
            let name = match t.as_str() {
                "" => p.display().to_string(),
                t => format!("{} {t}", p.display()),
            };
            let i = match by_tag.iter().position(|s| s.name == name) {
                Some(i) => i,
                None => {
                    by_tag.push(Series {
                        name,
                        hist: histogram(),
                        secs: 0.0,
                    });
                    by_tag.len() - 1
                }
            };
            by_tag[i].secs = by_tag[i].secs.max((iv.start + iv.duration).as_secs_f64());
            by_tag[i]
                .hist
                .add(&iv.hist)
                .map_err(|e| format!("{}: {e:?}", p.display()))?;
        }
        if by_tag.iter().all(|s| s.hist.is_empty()) {
            return Err(format!(
                "{}: no latencies{}",
                p.display(),
                tag.map(|t| format!(" tagged {t}")).unwrap_or_default()
            ));
        }
        out.extend(by_tag.into_iter().filter(|s| !s.hist.is_empty()));
    }
    Ok(out)
}

const TICKS: [f64; 6] = [50.0, 90.0, 99.0, 99.9, 99.99, 99.999];

fn x_of(p: f64) -> f64 {
    (1.0 / (1.0 - p / 100.0)).log10()
}

/// The figures, one line per series.
pub fn table(series: &[Series]) -> String {
    let mut s =
        String::from("series  count  secs  p50  p90  p99  p99.9  p99.99  p99.999  max (us)\n");
    for x in series {
        let _ = write!(s, "{}  {}  {:.1}", x.name, x.hist.len(), x.secs);
        for p in TICKS {
            let _ = write!(s, "  {:.2}", x.hist.value_at_percentile(p) as f64 / 1e3);
        }
        let _ = writeln!(s, "  {:.2}", x.hist.max() as f64 / 1e3);
    }
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A round step for about `n` ticks up to `max`.
fn step(max: f64, n: f64) -> f64 {
    let raw = (max / n).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * mag)
}

/// The SVG.
pub fn svg(series: &[Series], title: &str) -> String {
    const COLORS: [&str; 8] = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    ];
    let (w, h, l, r, t, b) = (900.0, 540.0, 80.0, 30.0, 50.0, 70.0);
    let (pw, ph) = (w - l - r, h - t - b);
    let (x0, x1) = (x_of(50.0), x_of(99.999));
    let ymax_us = series
        .iter()
        .map(|s| s.hist.value_at_percentile(99.999) as f64 / 1e3)
        .fold(0.0f64, f64::max)
        .max(0.001);
    let ystep = step(ymax_us, 6.0);
    let ytop = (ymax_us / ystep).ceil() * ystep;
    let px = |x: f64| l + (x - x0) / (x1 - x0) * pw;
    let py = |us: f64| t + ph - us.min(ytop) / ytop * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="25" text-anchor="middle" font-size="15">{}</text>"#,
        w / 2.0,
        esc(title)
    );
    for p in TICKS {
        let x = px(x_of(p));
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{t}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{p}%</text>"##,
            t + ph,
            t + ph + 18.0
        );
    }
    let mut y = 0.0;
    while y <= ytop + ystep / 2.0 {
        let yy = py(y);
        let _ = writeln!(
            s,
            r##"<line x1="{l}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            l + pw,
            l - 6.0,
            yy + 4.0,
            trim(y)
        );
        y += ystep;
    }
    let _ = writeln!(
        s,
        r#"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text>"#,
        l + pw / 2.0,
        h - 20.0
    );
    let _ = writeln!(
        s,
        r#"<text x="20" y="{:.1}" text-anchor="middle" transform="rotate(-90 20 {:.1})">latency (us)</text>"#,
        t + ph / 2.0,
        t + ph / 2.0
    );
    for (i, se) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let pts: Vec<String> = (0..=200)
            .map(|k| {
                let x = x0 + (x1 - x0) * f64::from(k) / 200.0;
                let p = 100.0 * (1.0 - 10f64.powf(-x));
                let us = se.hist.value_at_percentile(p) as f64 / 1e3;
                format!("{:.1},{:.1}", px(x), py(us))
            })
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
            pts.join(" ")
        );
        let ly = t + 16.0 + 18.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{c}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{} (n={})</text>"#,
            l + 12.0,
            l + 36.0,
            l + 42.0,
            ly + 4.0,
            esc(&se.name),
            se.hist.len()
        );
    }
    s.push_str("</svg>\n");
    s
}

fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// `rtrs-perf plot`.
pub fn run(
    logs: &[std::path::PathBuf],
    out: Option<&std::path::Path>,
    tag: Option<&str>,
    title: &str,
) -> Result<(), String> {
    let series = load(logs, tag)?;
    print!("{}", table(&series));
    if let Some(o) = out {
        std::fs::write(o, svg(&series, title)).map_err(|e| format!("{}: {e}", o.display()))?;
        eprintln!("wrote {}", o.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_svg_has_a_line_per_series_and_the_axes() {
        let mk = |name: &str, scale: u64| {
            let mut h = histogram();
            for v in 1..=10_000u64 {
                h.record(v * scale).unwrap();
            }
            Series {
                name: name.into(),
                hist: h,
                secs: 1.0,
            }
        };
        let s = svg(&[mk("a <read>", 10), mk("b", 20)], "t");
        assert_eq!(s.matches("<polyline").count(), 2);
        assert!(s.contains("99.999%") && s.contains("50%"));
        assert!(s.contains("a &lt;read&gt;"), "escaped");
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        let t = table(&[mk("a", 10)]);
        assert!(t.contains("a  10000  1.0  50.0"), "{t}");
        assert_eq!(step(87.0, 6.0), 20.0);
        assert_eq!(step(0.9, 6.0), 0.2);
    }
}
