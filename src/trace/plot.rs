//! PNG plots of a [`Summary`]. Text is drawn with a font compiled into the
//! binary (assets/fonts), so plotting needs no system font library.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use super::report::{PolicyCurves, Summary};
use crate::error::{Error, Result};

const FONT: &str = "sans-serif";
static FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/Go-Regular-subset.ttf");
static REGISTER: Once = Once::new();

/// Line colours, one per series (a colour-blind-safe palette, Okabe-Ito).
const PALETTE: [RGBColor; 6] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
];

/// Writes every plot into `dir`; returns the files written.
pub fn write_plots(summary: &Summary, dir: &Path) -> Result<Vec<PathBuf>> {
    REGISTER.call_once(|| {
        // The font is ours and fixed: failure would be a broken build, caught by the tests.
        let _ = register_font(FONT, FontStyle::Normal, FONT_BYTES);
    });
    let plots: [(&str, (u32, u32), Draw); 5] = [
        (
            "expert_load.png",
            (900, 120 + 40 * summary.moe_layers.len().min(48) as u32),
            draw_load,
        ),
        ("sch.png", (900, 560), draw_sch),
        ("hit_rates.png", (900, 560), draw_hit_rates),
        ("srp.png", (900, 520), draw_srp),
        (
            "coactivation.png",
            coactivation_size(summary),
            draw_coactivation,
        ),
    ];
    let mut written = Vec::new();
    for (name, size, draw) in plots {
        let path = dir.join(name);
        render(&path, size, |area| draw(summary, area))?;
        written.push(path);
    }
    Ok(written)
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type Draw = fn(&Summary, &Area<'_>) -> std::result::Result<(), String>;

/// Draws into an RGB buffer, encodes it as PNG to a temporary file, renames it.
fn render(
    path: &Path,
    (w, h): (u32, u32),
    draw: impl FnOnce(&Area<'_>) -> std::result::Result<(), String>,
) -> Result<()> {
    let mut buf = vec![255u8; (w * h * 3) as usize]; // [h, w, rgb]
    {
        let area = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        draw(&area).map_err(|e| Error::trace(path, format!("drawing: {e}")))?;
        area.present()
            .map_err(|e| Error::trace(path, format!("drawing: {e}")))?;
    }
    let tmp = path.with_extension("png.tmp");
    let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder
        .write_header()
        .and_then(|mut wr| wr.write_image_data(&buf).and_then(|_| wr.finish()))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::trace(path, format!("encoding PNG: {e}"))
        })?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn text(size: u32) -> TextStyle<'static> {
    (FONT, size).into_font().into()
}

/// White to dark blue, for shares and probabilities in `[0, 1]`.
fn heat(v: f64) -> RGBColor {
    let v = v.clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64| (a + (b - a) * v).round() as u8;
    RGBColor(lerp(255.0, 8.0), lerp(255.0, 48.0), lerp(255.0, 107.0))
}

fn s<E: std::fmt::Debug>(e: E) -> String {
    format!("{e:?}")
}

/// Layer x expert heat map of load shares, scaled so that the busiest cell is dark.
fn draw_load(summary: &Summary, area: &Area<'_>) -> std::result::Result<(), String> {
    area.fill(&WHITE).map_err(s)?;
    let (e, n) = (summary.num_experts, summary.load.len());
    let max_share = summary
        .load
        .iter()
        .flat_map(|l| l.shares.iter().copied())
        .fold(0f64, f64::max)
        .max(f64::MIN_POSITIVE);
    let caption = format!(
        "Expert load: share of each layer's choices (darkest {:.1}%, uniform {:.1}%)",
        100.0 * max_share,
        100.0 / e.max(1) as f64
    );
    let mut chart = ChartBuilder::on(area)
        .caption(caption, text(18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d((0..e).into_segmented(), (0..n).into_segmented())
        .map_err(s)?;
    let layers: Vec<usize> = summary.load.iter().map(|l| l.layer).collect();
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("expert")
        .y_desc("layer")
        .x_labels(e.min(32))
        .y_labels(n.min(48))
        .x_label_formatter(&|x| centre_label(x, |i| Some(i.to_string())))
        .y_label_formatter(&|y| centre_label(y, |i| layers.get(i).map(|l| l.to_string())))
        .label_style(text(13))
        .axis_desc_style(text(15))
        .draw()
        .map_err(s)?;
    chart
        .draw_series(summary.load.iter().enumerate().flat_map(|(row, l)| {
            l.shares
                .iter()
                .enumerate()
                .map(move |(x, &v)| cell(x, row, heat(v / max_share)))
        }))
        .map_err(s)?;
    Ok(())
}

/// A heat-map cell on segmented axes.
fn cell(
    x: usize,
    y: usize,
    color: RGBColor,
) -> Rectangle<(SegmentValue<usize>, SegmentValue<usize>)> {
    Rectangle::new(
        [
            (SegmentValue::Exact(x), SegmentValue::Exact(y)),
            (SegmentValue::Exact(x + 1), SegmentValue::Exact(y + 1)),
        ],
        color.filled(),
    )
}

/// Labels a segmented axis at segment centres only.
fn centre_label(v: &SegmentValue<usize>, name: impl Fn(usize) -> Option<String>) -> String {
    match v {
        SegmentValue::CenterOf(i) => name(*i).unwrap_or_default(),
        _ => String::new(),
    }
}

type LineChart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

fn draw_legend<'a>(chart: &mut LineChart<'a, 'a>) -> std::result::Result<(), String> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(text(13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(s)
}

/// Lines of hit rate against cache size in multiples of top-k.
struct Lines<'a> {
    caption: String,
    x: &'a [f64],
    series: Vec<(String, &'a [f64], bool)>,
}

fn draw_lines(area: &Area<'_>, lines: Lines<'_>) -> std::result::Result<(), String> {
    area.fill(&WHITE).map_err(s)?;
    let x_max = lines.x.last().copied().unwrap_or(1.0).max(1e-9);
    let mut chart = ChartBuilder::on(area)
        .caption(&lines.caption, text(18))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..x_max, 0f64..1f64)
        .map_err(s)?;
    chart
        .configure_mesh()
        .x_desc("cache size per layer (multiples of top-k)")
        .y_desc("hit rate")
        .label_style(text(13))
        .axis_desc_style(text(15))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(s)?;
    for (i, (label, ys, dashed)) in lines.series.iter().enumerate() {
        let color = PALETTE[(i / if lines.series.iter().any(|l| l.2) {
            2
        } else {
            1
        }) % PALETTE.len()];
        let style = color.stroke_width(2);
        let points: Vec<(f64, f64)> = lines.x.iter().copied().zip(ys.iter().copied()).collect();
        let legend = move |(x, y): (i32, i32)| PathElement::new(vec![(x, y), (x + 22, y)], style);
        if *dashed {
            chart
                .draw_series(DashedLineSeries::new(points, 6, 4, style))
                .map_err(s)?
                .label(label.as_str())
                .legend(legend);
        } else {
            chart
                .draw_series(LineSeries::new(points, style))
                .map_err(s)?
                .label(label.as_str())
                .legend(legend);
        }
    }
    draw_legend(&mut chart)
}

fn draw_sch(summary: &Summary, area: &Area<'_>) -> std::result::Result<(), String> {
    let mut series: Vec<(String, &[f64], bool)> = summary
        .sch
        .model
        .iter()
        .map(|c| {
            (
                format!("SCH, next {} tokens", c.segment),
                c.hit_rate.as_slice(),
                false,
            )
        })
        .collect();
    series.push((
        "LRU".into(),
        summary.paper_counting.model.lru.as_slice(),
        false,
    ));
    series.push((
        "Belady".into(),
        summary.paper_counting.model.belady.as_slice(),
        false,
    ));
    draw_lines(
        area,
        Lines {
            caption: "SCH: hit rate of a cache that evicts the expert needed least soon (model level, paper's counting)".into(),
            x: &summary.cache_in_top_k,
            series,
        },
    )
}

fn draw_hit_rates(summary: &Summary, area: &Area<'_>) -> std::result::Result<(), String> {
    let (p, e): (&PolicyCurves, &PolicyCurves) = (
        &summary.paper_counting.model,
        &summary.engine_counting.model,
    );
    let series = vec![
        ("LRU, paper's counting".to_string(), p.lru.as_slice(), false),
        ("LRU, engine's counting".to_string(), e.lru.as_slice(), true),
        ("LFU, paper's counting".to_string(), p.lfu.as_slice(), false),
        (
            "LFU (ageing), engine's counting".to_string(),
            e.lfu.as_slice(),
            true,
        ),
        (
            "Belady, paper's counting".to_string(),
            p.belady.as_slice(),
            false,
        ),
        (
            "Belady, engine's counting".to_string(),
            e.belady.as_slice(),
            true,
        ),
    ];
    draw_lines(
        area,
        Lines {
            caption:
                "Expert cache hit rate against cache size (model level, one pool for all layers)"
                    .into(),
            x: &summary.cache_in_top_k,
            series,
        },
    )
}

fn draw_srp(summary: &Summary, area: &Area<'_>) -> std::result::Result<(), String> {
    area.fill(&WHITE).map_err(s)?;
    let layers: Vec<usize> = summary.srp.layers.iter().map(|l| l.layer).collect();
    let n = layers.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(
            "SRP: best F1 of predicting a segment's experts, per layer",
            text(18),
        )
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..1f64)
        .map_err(s)?;
    chart
        .configure_mesh()
        .x_desc("layer")
        .y_desc("SRP (F1)")
        .x_labels(n.min(24))
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                layers
                    .get(i as usize)
                    .map_or(String::new(), |l| l.to_string())
            } else {
                String::new()
            }
        })
        .label_style(text(13))
        .axis_desc_style(text(15))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(s)?;
    for (si, &m) in super::srp::SEGMENT_LENGTHS.iter().enumerate() {
        let color = PALETTE[si % PALETTE.len()];
        let points: Vec<(f64, f64)> = (summary.srp.layers.iter().enumerate())
            .filter_map(|(i, l)| l.segments.get(si).map(|srp| (i as f64, srp.f1)))
            .collect();
        let model = summary.srp.model.get(si).map_or(0.0, |m| m.f1);
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(s)?
            .label(format!("{m} tokens (model {model:.3})"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 22, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 3, color.filled())),
            )
            .map_err(s)?;
    }
    draw_legend(&mut chart)
}

/// Panels per row of the co-activation grid, and how many pairs are drawn.
const COACT_COLUMNS: usize = 3;
const COACT_MAX_PANELS: usize = 12;

fn coactivation_panels(summary: &Summary) -> Vec<usize> {
    let n = summary.coactivation.len();
    if n <= COACT_MAX_PANELS {
        return (0..n).collect();
    }
    // Evenly spaced pairs, first and last included.
    (0..COACT_MAX_PANELS)
        .map(|i| i * (n - 1) / (COACT_MAX_PANELS - 1))
        .collect()
}

fn coactivation_size(summary: &Summary) -> (u32, u32) {
    let panels = coactivation_panels(summary).len().max(1);
    let cols = panels.min(COACT_COLUMNS) as u32;
    let rows = panels.div_ceil(COACT_COLUMNS) as u32;
    (cols * 340, 50 + rows * 340)
}

fn draw_coactivation(summary: &Summary, area: &Area<'_>) -> std::result::Result<(), String> {
    area.fill(&WHITE).map_err(s)?;
    let panels = coactivation_panels(summary);
    let body = area
        .titled(
            "Co-activation: P(expert j at layer L+1 | expert i at layer L)",
            text(18),
        )
        .map_err(s)?;
    if panels.is_empty() {
        body.draw(&Text::new(
            "fewer than two MoE layers: no layer pairs",
            (20, 20),
            text(15),
        ))
        .map_err(s)?;
        return Ok(());
    }
    let rows = panels.len().div_ceil(COACT_COLUMNS);
    let cols = panels.len().min(COACT_COLUMNS);
    let cells = body.split_evenly((rows, cols));
    let e = summary.num_experts;
    for (area, &pi) in cells.iter().zip(&panels) {
        let Some(c) = summary.coactivation.get(pi) else {
            continue;
        };
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!(
                    "{} -> {}  (MI {:.2} bits)",
                    c.from_layer, c.to_layer, c.mutual_information_bits
                ),
                text(14),
            )
            .margin(6)
            .x_label_area_size(28)
            .y_label_area_size(30)
            .build_cartesian_2d((0..e).into_segmented(), (0..e).into_segmented())
            .map_err(s)?;
        let step = e.div_ceil(8).max(1);
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc(format!("j (layer {})", c.to_layer))
            .y_desc(format!("i (layer {})", c.from_layer))
            .x_labels(e)
            .y_labels(e)
            .x_label_formatter(&|x| centre_label(x, |i| (i % step == 0).then(|| i.to_string())))
            .y_label_formatter(&|y| centre_label(y, |i| (i % step == 0).then(|| i.to_string())))
            .label_style(text(11))
            .axis_desc_style(text(12))
            .draw()
            .map_err(s)?;
        chart
            .draw_series(c.conditional.iter().enumerate().flat_map(|(i, row)| {
                row.iter()
                    .enumerate()
                    .map(move |(j, &p)| cell(j, i, heat(p)))
            }))
            .map_err(s)?;
    }
    Ok(())
}
