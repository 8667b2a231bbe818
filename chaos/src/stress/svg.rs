//! Line charts as hand-written SVG: a few polylines, axes with ticks, a legend. Written by
//! hand rather than with `plotters`: two simple charts do not justify a plotting library's
//! dependency tree, and the output stays small and diffable.

use std::fmt::Write as _;

const W: f64 = 900.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 200.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf",
];

#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    /// Index into the palette (one per system).
    pub colour: usize,
    pub dashed: bool,
    pub points: Vec<(f64, f64)>,
}

/// Escapes text for SVG element content and attribute values.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" upper bound and tick step for `max` (1, 2 or 5 times a power of ten).
fn nice(max: f64) -> (f64, f64) {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e9 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let all = series.iter().flat_map(|s| s.points.iter());
    let (xmax, xstep) = nice(all.clone().map(|p| p.0).fold(0.0, f64::max));
    let (ymax, ystep) = nice(all.map(|p| p.1).fold(0.0, f64::max));
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let sx = |x: f64| LEFT + x / xmax * pw;
    let sy = |y: f64| TOP + ph - y / ymax * ph;
    let mut o = String::new();
    let _ = write!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(o, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = write!(
        o,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        LEFT + pw / 2.0,
        escape(title)
    );
    // Grid, ticks and labels.
    let mut y = 0.0;
    while y <= ymax + ystep / 2.0 {
        let py = sy(y);
        let _ = write!(
            o,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            py + 4.0,
            num(y)
        );
        y += ystep;
    }
    let mut x = 0.0;
    while x <= xmax + xstep / 2.0 {
        let px = sx(x);
        let _ = write!(
            o,
            r##"<line x1="{px:.1}" y1="{:.1}" x2="{px:.1}" y2="{:.1}" stroke="#999"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            TOP + ph,
            TOP + ph + 5.0,
            TOP + ph + 18.0,
            num(x)
        );
        x += xstep;
    }
    let _ = write!(
        o,
        r##"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{:.1}" stroke="black"/><line x1="{LEFT}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/>"##,
        TOP + ph,
        TOP + ph,
        LEFT + pw,
        TOP + ph
    );
    let _ = write!(
        o,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        H - 10.0,
        escape(x_label)
    );
    let _ = write!(
        o,
        r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        escape(y_label)
    );
    // Series and legend.
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[s.colour % COLOURS.len()];
        let dash = if s.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let pts: Vec<String> = s
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        if !pts.is_empty() {
            let _ = write!(
                o,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5"{dash} points="{}"/>"#,
                pts.join(" ")
            );
        }
        let ly = TOP + 10.0 + i as f64 * 18.0;
        let lx = W - RIGHT + 15.0;
        let _ = write!(
            o,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
            lx + 25.0,
            lx + 32.0,
            ly + 4.0,
            escape(&s.label)
        );
    }
    o.push_str("</svg>\n");
    o
}

/// Minimal well-formedness check for the SVG this module writes (and tests): every tag is
/// closed in order, attributes are quoted, no raw `<`/`&` in text. Not a general XML parser.
pub fn well_formed(doc: &str) -> Result<(), String> {
    let mut stack: Vec<&str> = Vec::new();
    let mut rest = doc.trim();
    if !rest.starts_with("<svg") {
        return Err("does not start with <svg".into());
    }
    while let Some(open) = rest.find('<') {
        let text = &rest[..open];
        if text.contains('>') || (text.contains('&') && !valid_entities(text)) {
            return Err(format!("bad text {text:?}"));
        }
        let close = rest[open..].find('>').ok_or("unterminated tag")? + open;
        let tag = &rest[open + 1..close];
        if tag.contains('<') {
            return Err(format!("'<' inside tag {tag:?}"));
        }
        if !tag.matches('"').count().is_multiple_of(2) {
            return Err(format!("unbalanced quotes in {tag:?}"));
        }
        if let Some(name) = tag.strip_prefix('/') {
            match stack.pop() {
                Some(open_name) if open_name == name.trim() => {}
                other => return Err(format!("</{name}> closes {other:?}")),
            }
        } else if !tag.ends_with('/') {
            let name = tag.split_whitespace().next().ok_or("empty tag")?;
            stack.push(name);
        }
        rest = &rest[close + 1..];
        if stack.is_empty() {
            return if rest.trim().is_empty() {
                Ok(())
            } else {
                Err("content after the root element".into())
            };
        }
    }
    Err(format!("unclosed elements {stack:?}"))
}

fn valid_entities(text: &str) -> bool {
    text.split('&').skip(1).all(|t| {
        ["amp;", "lt;", "gt;", "quot;", "apos;"]
            .iter()
            .any(|e| t.starts_with(e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_bounds() {
        assert_eq!(nice(0.0), (1.0, 0.2));
        assert_eq!(nice(97.0), (100.0, 20.0));
        assert_eq!(nice(7.0), (8.0, 2.0));
    }

    #[test]
    fn chart_is_well_formed_and_escapes_labels() {
        let svg = line_chart(
            "a <b> & c",
            "x",
            "y",
            &[
                Series {
                    label: "drover \"p50\"".into(),
                    colour: 0,
                    dashed: false,
                    points: vec![(0.0, 1.0), (1.0, 5.0), (2.0, 3.0)],
                },
                Series {
                    label: "empty".into(),
                    colour: 7,
                    dashed: true,
                    points: vec![],
                },
            ],
        );
        well_formed(&svg).expect("well formed");
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert!(svg.contains("a &lt;b&gt; &amp; c"));
        assert!(svg.contains("drover &quot;p50&quot;"));
        assert!(well_formed("<svg><g></svg>").is_err());
        assert!(well_formed("<svg><text>a < b</text></svg>").is_err());
        assert!(well_formed("<svg x=\"1></svg>").is_err());
    }
}
