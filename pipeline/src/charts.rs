//! The attribution report as charts: one SVG (`attribution.svg` in every
//! artifact, and the dashboard's job page) with three panels.
//!
//! - The waterfall of the ratio: one bar per stage row, from the ratio
//!   before it to the ratio after it on a log axis, so each bar's height is
//!   its share of ln(source / artifact); the last bar is the whole ratio.
//! - Bits per weight per layer: every stored byte of the layer's tensors
//!   (parts, header and manifest entries) over its parameters.
//! - SQNR per layer: the parameter-weighted mean of its lossy tensors' SQNR;
//!   a layer stored losslessly has no bar.
//!
//! The same report always draws the same bytes (no clock, no randomness),
//! so artifacts stay byte-identical however many nodes made them.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::attribution::Attribution;

/// Width of the chart image, pixels.
pub const WIDTH: u32 = 960;
/// Height of one panel, pixels.
pub const PANEL_HEIGHT: u32 = 340;

const FONT: &str = "sans-serif";
const SAVED: RGBColor = RGBColor(46, 125, 50);
const ADDED: RGBColor = RGBColor(198, 40, 40);
const TOTAL: RGBColor = RGBColor(21, 101, 192);
const BPW: RGBColor = RGBColor(94, 53, 177);
const SQNR: RGBColor = RGBColor(0, 131, 143);

/// Draws `report` as one SVG document of three panels (see the module
/// doc); `Err` carries the drawing library's message.
pub fn attribution_svg(report: &Attribution) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, 3 * PANEL_HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let panels = root.split_evenly((3, 1));
        waterfall(&panels[0], report)?;
        let layers: Vec<(String, Option<f64>)> = report
            .layers
            .iter()
            .map(|l| {
                let bpw = (l.params > 0).then(|| 8.0 * l.artifact_bytes as f64 / l.params as f64);
                (short_layer(&l.layer), bpw)
            })
            .collect();
        bars(
            &panels[1],
            &format!("{}: bits per weight by layer", report.job),
            "bits per weight",
            &layers,
            BPW,
            2,
        )?;
        let sqnr: Vec<(String, Option<f64>)> = report
            .layers
            .iter()
            .map(|l| (short_layer(&l.layer), l.sqnr_db.filter(|v| v.is_finite())))
            .collect();
        bars(
            &panels[2],
            &format!(
                "{}: SQNR by layer (dB; no bar: stored losslessly)",
                report.job
            ),
            "SQNR, dB",
            &sqnr,
            SQNR,
            1,
        )?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

fn err<E: std::fmt::Display>(e: E) -> String {
    format!("drawing the attribution charts: {e}")
}

/// Text centred above the point it is drawn at.
fn label_style(size: u32) -> TextStyle<'static> {
    (FONT, size)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Bottom))
}

/// `layer.12` → `12` (the axis says "layer"); other names as they are.
fn short_layer(name: &str) -> String {
    name.strip_prefix("layer.").unwrap_or(name).to_string()
}

/// The ratio after each stage row, starting from 1 (the source).
fn cumulative(report: &Attribution) -> Vec<(f64, f64)> {
    let mut at = 0.0_f64;
    report
        .stages
        .iter()
        .map(|s| {
            let before = at;
            at += s.log_ratio;
            (before.exp(), at.exp())
        })
        .collect()
}

fn waterfall(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    report: &Attribution,
) -> Result<(), String> {
    let steps = cumulative(report);
    let mut names: Vec<String> = report.stages.iter().map(|s| s.stage.clone()).collect();
    names.push("total".into());
    let total = report.ratio.max(f64::MIN_POSITIVE);
    let values = steps
        .iter()
        .flat_map(|&(a, b)| [a, b])
        .chain([1.0, total])
        .filter(|v| v.is_finite() && *v > 0.0);
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    // Room above the tallest bar for its label.
    let (lo, hi) = (lo / 1.15, hi * 1.6);
    let n = names.len();
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!(
                "{}: the ratio stage by stage ({:.3}× in all; log axis)",
                report.job, report.ratio
            ),
            (FONT, 18),
        )
        .margin(12)
        .x_label_area_size(34)
        .y_label_area_size(64)
        .build_cartesian_2d((0..n - 1).into_segmented(), (lo..hi).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .x_labels(n)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .y_desc("ratio (source / bytes so far)")
        .y_label_formatter(&|v| format!("{v:.2}×"))
        .label_style((FONT, 12))
        .draw()
        .map_err(err)?;
    let mut bars: Vec<(usize, f64, f64, RGBColor)> = steps
        .iter()
        .enumerate()
        .map(|(i, &(a, b))| (i, a, b, if b >= a { SAVED } else { ADDED }))
        .collect();
    bars.push((n - 1, 1.0, total, TOTAL));
    chart
        .draw_series(bars.iter().map(|&(i, a, b, colour)| {
            let mut r = Rectangle::new(
                [
                    (SegmentValue::Exact(i), a.min(b)),
                    (SegmentValue::Exact(i + 1), a.max(b)),
                ],
                colour.filled(),
            );
            r.set_margin(0, 0, 10, 10);
            r
        }))
        .map_err(err)?;
    chart
        .draw_series(bars.iter().map(|&(i, a, b, _)| {
            let step = if i + 1 == n { b } else { b / a };
            Text::new(
                format!("×{step:.3}"),
                (SegmentValue::CenterOf(i), a.max(b) * 1.02),
                label_style(12),
            )
        }))
        .map_err(err)?;
    Ok(())
}

fn bars(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    title: &str,
    axis: &str,
    values: &[(String, Option<f64>)],
    colour: RGBColor,
    decimals: usize,
) -> Result<(), String> {
    let n = values.len().max(1);
    let top = values
        .iter()
        .filter_map(|(_, v)| *v)
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max);
    let hi = if top > 0.0 { top * 1.2 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 18))
        .margin(12)
        .x_label_area_size(34)
        .y_label_area_size(64)
        .build_cartesian_2d((0..n - 1).into_segmented(), 0.0..hi)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .x_labels(n)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => values.get(*i).map(|(l, _)| l.clone()).unwrap_or_default(),
            _ => String::new(),
        })
        .x_desc("layer")
        .y_desc(axis)
        .label_style((FONT, 12))
        .draw()
        .map_err(err)?;
    let present: Vec<(usize, f64)> = values
        .iter()
        .enumerate()
        .filter_map(|(i, (_, v))| v.filter(|v| v.is_finite()).map(|v| (i, v.max(0.0))))
        .collect();
    chart
        .draw_series(present.iter().map(|&(i, v)| {
            let mut r = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), v),
                ],
                colour.filled(),
            );
            r.set_margin(0, 0, 3, 3);
            r
        }))
        .map_err(err)?;
    // Values on the bars while they fit (a few dozen layers).
    if values.len() <= 40 {
        chart
            .draw_series(present.iter().map(|&(i, v)| {
                Text::new(
                    format!("{v:.decimals$}"),
                    (SegmentValue::CenterOf(i), v + hi * 0.01),
                    label_style(10),
                )
            }))
            .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::{LayerRow, StageRow, Subset};

    fn report() -> Attribution {
        let stage = |name: &str, bytes_in: u64, bytes_out: u64| StageRow {
            stage: name.into(),
            tensors: 3,
            bytes_in,
            bytes_out,
            log_ratio: (bytes_in as f64 / bytes_out as f64).ln(),
            share: 0.0,
            error_share: 0.0,
            sqnr_db: Some(20.0),
            seconds: 0.1,
        };
        let layer = |name: &str, params: u64, bytes: u64, sqnr: Option<f64>| LayerRow {
            layer: name.into(),
            tensors: 2,
            params,
            source_bytes: params * 4,
            artifact_bytes: bytes,
            ratio: (params * 4) as f64 / bytes as f64,
            sqnr_db: sqnr,
            seconds: 0.2,
        };
        Attribution {
            job: "charted".into(),
            source_bytes: 4000,
            artifact_bytes: 650,
            ratio: 4000.0 / 650.0,
            compressed: Subset {
                tensors: 3,
                params: 1000,
                bytes: 600,
                bits_per_weight: 4.8,
                mean_sqnr_db: Some(20.0),
                pooled_sqnr_db: Some(19.0),
            },
            stages: vec![
                stage("uniform", 4000, 600),
                stage("zstd", 600, 560),
                stage("container", 560, 650),
            ],
            layers: vec![
                layer("layer.0", 500, 300, Some(21.5)),
                layer("layer.1", 500, 300, Some(18.3)),
                layer("embeddings", 100, 400, None),
            ],
            seconds: 1.0,
            extra: Default::default(),
        }
    }

    /// The text of every `<text>` element, trimmed.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                let body = &t[t.find('>')? + 1..];
                Some(body[..body.find("</text>")?].trim().to_string())
            })
            .collect()
    }

    #[test]
    fn the_charts_name_every_stage_and_layer_and_draw_the_same_bytes_twice() {
        let r = report();
        let svg = attribution_svg(&r).unwrap();
        let texts = texts(&svg);
        let has = |t: &str| texts.iter().any(|x| x == t);
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        assert!(svg.trim_end().ends_with("</svg>"));
        for name in [
            "uniform",
            "zstd",
            "container",
            "total",
            "embeddings",
            "0",
            "1",
        ] {
            assert!(has(name), "{name} missing from {texts:?}");
        }
        // Each stage's own step and the whole ratio are written on the bars.
        assert!(has("×6.667"), "uniform's step: {texts:?}");
        assert!(has("×0.862"), "the container's step: {texts:?}");
        assert!(has(&format!("×{:.3}", r.ratio)));
        // Bits per weight: 8 × 300 / 500 = 4.80, and 8 × 400 / 100 = 32.00
        // for the kept embeddings; SQNR 21.5 and 18.3 dB, no bar for the
        // lossless embeddings.
        assert!(has("4.80") && has("32.00"), "bits per weight: {texts:?}");
        assert!(has("21.5") && has("18.3"), "SQNR: {texts:?}");
        let sqnr_bars = svg
            .matches(&format!(
                "fill=\"#{:02X}{:02X}{:02X}\"",
                SQNR.0, SQNR.1, SQNR.2
            ))
            .count();
        assert_eq!(sqnr_bars, 2, "one SQNR bar a lossy layer");
        assert_eq!(svg, attribution_svg(&r).unwrap());
    }

    #[test]
    fn the_waterfall_steps_multiply_to_the_whole_ratio() {
        let r = report();
        let steps = cumulative(&r);
        assert_eq!(steps[0].0, 1.0);
        for w in steps.windows(2) {
            assert!((w[0].1 - w[1].0).abs() < 1e-12);
        }
        let last = steps.last().unwrap().1;
        assert!(
            (last - r.ratio).abs() / r.ratio < 1e-9,
            "{last} vs {}",
            r.ratio
        );
    }

    #[test]
    fn an_empty_report_still_draws() {
        let mut r = report();
        r.stages.clear();
        r.layers.clear();
        r.ratio = 1.0;
        let svg = attribution_svg(&r).unwrap();
        assert!(texts(&svg).iter().any(|t| t == "total"));
    }

    #[test]
    fn names_are_escaped_in_the_drawing() {
        let mut r = report();
        r.job = "a<b>&c".into();
        let svg = attribution_svg(&r).unwrap();
        assert!(!svg.contains("a<b>"), "unescaped job name");
        assert!(svg.contains("a&lt;b&gt;&amp;c"));
    }
}
